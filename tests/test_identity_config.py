"""
Tests for `twistauth.identity.config.ProviderConfig`: a provider's settings
table is checked, and every error names the key.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Dict

from twisted.trial.unittest import SynchronousTestCase

from twistauth.identity.config import DEFAULT_ALGS, ProviderConfig


def table(**changes: Any) -> Dict[str, Any]:
    values: Dict[str, Any] = {
        "issuer": "https://op.example",
        "client_id": "client",
        "client_secret": "secret",
        "redirect_uri": "https://rp.example/redirect",
    }
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


class ConfigTests(SynchronousTestCase):
    def assertBad(self, key: str, **changes: Any) -> None:
        with self.assertRaises(ValueError) as caught:
            ProviderConfig.from_mapping("corp", table(**changes))
        self.assertIn("corp", str(caught.exception))
        self.assertIn(key, str(caught.exception))

    def test_minimal(self) -> None:
        config = ProviderConfig.from_mapping("corp", table())
        self.assertEqual(config.name, "corp")
        self.assertEqual(config.scopes, ("openid", "profile", "email"))
        self.assertEqual(config.token_endpoint_auth_method, "client_secret_basic")
        self.assertEqual(config.allowed_algs, DEFAULT_ALGS)
        self.assertNotIn("none", config.allowed_algs)
        self.assertFalse(any(a.startswith("HS") for a in config.allowed_algs))
        self.assertEqual(config.leeway, 30)
        self.assertEqual(config.login_ttl, 600)
        self.assertFalse(config.require_logout_typ)
        self.assertEqual(config.endpoint_overrides, {})

    def test_secret_not_in_repr(self) -> None:
        config = ProviderConfig.from_mapping("corp", table(client_secret="very-secret-value"))
        self.assertNotIn("very-secret-value", repr(config))

    def test_secret_from_file(self) -> None:
        fd, path = tempfile.mkstemp()
        self.addCleanup(os.remove, path)
        with os.fdopen(fd, "w") as f:
            f.write("from-a-file\n")
        config = ProviderConfig.from_mapping("corp", table(client_secret=f"file:{path}"))
        self.assertEqual(config.client_secret, "from-a-file")
        self.assertBad("client_secret", client_secret="file:/nonexistent/secret")

    def test_required_keys(self) -> None:
        for key in ("issuer", "client_id", "redirect_uri"):
            self.assertBad(key, **{key: None})
        self.assertBad("client_secret", client_secret=None)

    def test_unknown_key(self) -> None:
        self.assertBad("clientid", clientid="x")

    def test_issuer_and_uris(self) -> None:
        self.assertBad("issuer", issuer="http://op.example")
        self.assertBad("issuer", issuer="op.example")
        self.assertBad("redirect_uri", redirect_uri="/redirect")
        self.assertBad("token_endpoint", token_endpoint="http://op.example/token")
        self.assertBad("post_logout_redirect_uri", post_logout_redirect_uri="ftp://x.example/")
        loopback = ProviderConfig.from_mapping("dev", table(issuer="http://127.0.0.1:9400",
                                                            redirect_uri="http://localhost/r"))
        self.assertEqual(loopback.issuer, "http://127.0.0.1:9400")

    def test_scopes(self) -> None:
        self.assertBad("scopes", scopes=["profile"])
        self.assertBad("scopes", scopes="openid profile")
        self.assertBad("scopes", scopes=["openid", "a b"])
        self.assertEqual(ProviderConfig.from_mapping("c", table(scopes=["openid"])).scopes,
                         ("openid",))

    def test_extra_params(self) -> None:
        self.assertBad("extra_params", extra_params={"state": "x"})
        self.assertBad("extra_params", extra_params={"prompt": 1})
        config = ProviderConfig.from_mapping("c", table(extra_params={"prompt": "login"}))
        self.assertEqual(config.extra_params, {"prompt": "login"})

    def test_auth_method(self) -> None:
        self.assertBad("token_endpoint_auth_method", token_endpoint_auth_method="none")
        self.assertBad("token_endpoint_auth_method",
                       token_endpoint_auth_method="private_key_jwt")

    def test_algorithms(self) -> None:
        self.assertBad("allowed_algs", allowed_algs=["none"])
        self.assertBad("allowed_algs", allowed_algs=["RS256", "none"])
        self.assertBad("allowed_algs", allowed_algs=[])
        self.assertBad("allowed_algs", allowed_algs="RS256")
        config = ProviderConfig.from_mapping("c", table(allowed_algs=["RS256", "HS256"]))
        self.assertEqual(config.allowed_algs, ("RS256", "HS256"))

    def test_ranges(self) -> None:
        self.assertBad("leeway", leeway=61)
        self.assertBad("leeway", leeway=-1)
        self.assertBad("leeway", leeway="30")
        self.assertBad("login_ttl", login_ttl=901)
        self.assertBad("http_timeout", http_timeout=0)
        self.assertBad("max_response_bytes", max_response_bytes=10)
        self.assertBad("max_age", max_age=-5)
        self.assertBad("require_logout_typ", require_logout_typ="yes")
        with self.assertRaises(ValueError):
            ProviderConfig.from_mapping("Bad Name", table())

    def test_discovery_off_needs_endpoints(self) -> None:
        self.assertBad("discovery", discovery=False)
        config = ProviderConfig.from_mapping("c", table(
            discovery=False,
            authorization_endpoint="https://op.example/a",
            token_endpoint="https://op.example/t",
            jwks_uri="https://op.example/k",
        ))
        self.assertEqual(set(config.endpoint_overrides),
                         {"authorization_endpoint", "token_endpoint", "jwks_uri"})
