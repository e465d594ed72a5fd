"""
Tests for `twistauth.identity.discovery`: metadata fetched, checked, kept.

Checklist cases 36 and 37; conformance rp-discovery-openid-configuration,
rp-discovery-jwks_uri-keys and rp-discovery-issuer-not-matching-config.
"""

from __future__ import annotations

from typing import Any, Dict, List

from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from twistauth.identity.discovery import MetadataSource, discovery_url, parse_metadata
from twistauth.identity.errors import ProviderDisabledError, ProviderUnavailableError
from twistauth.identity.http import ProviderHTTP
from twistauth.testing._provider import FakeProvider

EPOCH = 1_700_000_000


class DiscoveryTestCase(SynchronousTestCase):
    issuer = "https://op.example"

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.provider = FakeProvider(clock=self.clock, issuer=self.issuer)
        self.stub = self.provider.stub()
        self.events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def source(self, **overrides: Any) -> MetadataSource:
        config = self.provider.config(**overrides)
        http = ProviderHTTP(client=self.stub, clock=self.clock)
        return MetadataSource(config=config, http=http, clock=self.clock)

    def logged(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)


class MetadataTests(DiscoveryTestCase):
    def test_metadata_read(self) -> None:
        metadata = self.successResultOf(self.source().get())
        self.assertEqual(metadata.issuer, self.provider.issuer)
        self.assertEqual(metadata.jwks_uri, self.provider.url("jwks"))
        self.assertEqual(metadata.token_endpoint, self.provider.url("token"))
        self.assertEqual(metadata.end_session_endpoint, self.provider.url("end_session"))
        self.assertTrue(metadata.iss_parameter_supported)
        self.assertEqual(metadata.id_token_signing_alg_values_supported, ("RS256",))
        self.assertTrue(metadata.backchannel_logout_supported)
        self.assertFalse(metadata.loopback_http)
        self.assertEqual(self.provider.hits["discovery"], 1)

    def test_fetched_once_and_shared(self) -> None:
        source = self.source()
        self.provider.misbehave("discovery", "slow")
        self.provider.slow_seconds = 1
        pending = [source.get() for _ in range(10)]
        self.clock.advance(1)
        self.stub.flush()
        results = {id(self.successResultOf(d)) for d in pending}
        self.assertEqual(len(results), 1)
        self.successResultOf(source.get())
        self.assertEqual(self.provider.hits["discovery"], 1)

    def test_iss_parameter_not_announced(self) -> None:
        self.provider.misbehave("discovery", "no_iss_parameter_supported")
        self.assertFalse(self.successResultOf(self.source().get()).iss_parameter_supported)

    def test_endpoint_overrides_win(self) -> None:
        metadata = self.successResultOf(
            self.source(token_endpoint="https://other.example/token").get()
        )
        self.assertEqual(metadata.token_endpoint, "https://other.example/token")
        self.assertEqual(metadata.jwks_uri, self.provider.url("jwks"))

    def test_discovery_off(self) -> None:
        source = self.source(
            discovery=False,
            authorization_endpoint="https://op.example/authorize",
            token_endpoint="https://op.example/token",
            jwks_uri="https://op.example/jwks",
        )
        metadata = self.successResultOf(source.get())
        self.assertIsNone(metadata.userinfo_endpoint)
        self.assertIsNone(metadata.end_session_endpoint)
        self.assertFalse(metadata.iss_parameter_supported)
        self.assertEqual(self.provider.hits["discovery"], 0)

    def test_discovery_url(self) -> None:
        self.assertEqual(discovery_url("https://a.example"),
                         "https://a.example/.well-known/openid-configuration")
        self.assertEqual(discovery_url("https://a.example/realms/x/"),
                         "https://a.example/realms/x/.well-known/openid-configuration")


class IssuerWithPathTests(DiscoveryTestCase):
    issuer = "https://op.example/realms/test"

    def test_issuer_with_path(self) -> None:
        metadata = self.successResultOf(self.source().get())
        self.assertEqual(metadata.issuer, "https://op.example/realms/test")
        self.assertEqual(metadata.jwks_uri, "https://op.example/realms/test/jwks")


class DisabledTests(DiscoveryTestCase):
    def test_issuer_mismatch_disables(self) -> None:
        """#36: the metadata issuer differs (a trailing slash counts)."""
        self.provider.misbehave("discovery", "wrong_issuer")
        source = self.source()
        failure = self.failureResultOf(source.get(), ProviderDisabledError)
        self.assertEqual(failure.value.status, 503)
        self.assertIn("is not the configured issuer", str(failure.value))
        self.assertIn("disabled", self.logged())
        self.assertIn("fake", self.logged())
        # Disabled for good: no more fetches.
        self.failureResultOf(source.get(), ProviderDisabledError)
        self.clock.advance(3600)
        self.failureResultOf(source.get(), ProviderDisabledError)
        self.assertEqual(self.provider.hits["discovery"], 1)
        self.assertIsNotNone(source.disabled)

    def test_login_answers_503_when_disabled(self) -> None:
        """#36: login on a disabled provider: 503, no authorize URL."""
        self.provider.misbehave("discovery", "wrong_issuer")
        rp = self.provider.relying_party(http_client=self.stub)
        failure = self.failureResultOf(rp.start("/"), ProviderDisabledError)
        self.assertEqual(failure.value.status, 503)

    def test_plain_http_jwks_uri_disables(self) -> None:
        """#37."""
        self.provider.misbehave("discovery", "http_endpoint")
        failure = self.failureResultOf(self.source().get(), ProviderDisabledError)
        self.assertIn("jwks_uri must use https", str(failure.value))

    def test_no_common_algorithm_disables(self) -> None:
        failure = self.failureResultOf(self.source(allowed_algs=["ES256"]).get(),
                                       ProviderDisabledError)
        self.assertIn("allowed_algs", str(failure.value))

    def test_bad_documents(self) -> None:
        config = self.provider.config()
        good = self.provider.discovery()
        bad = {
            "not an object": [],
            "issuer missing": {k: v for k, v in good.items() if k != "issuer"},
            "issuer array": dict(good, issuer=[good["issuer"]]),
            "issuer case": dict(good, issuer="https://OP.example"),
            "no token endpoint": {k: v for k, v in good.items() if k != "token_endpoint"},
            "endpoint not a string": dict(good, authorization_endpoint=5),
            "relative endpoint": dict(good, token_endpoint="/token"),
            "endpoint with fragment": dict(good, token_endpoint="https://op.example/t#x"),
            "endpoint with user info": dict(good, userinfo_endpoint="https://u:p@op.example/"),
            "javascript endpoint": dict(good, end_session_endpoint="javascript:alert(1)"),
            "http userinfo": dict(good, userinfo_endpoint="http://op.example/userinfo"),
        }
        for what, document in bad.items():
            with self.subTest(what):
                self.assertRaises(ProviderDisabledError, parse_metadata, document, config)


class LoopbackTests(DiscoveryTestCase):
    issuer = "http://127.0.0.1:9400"

    def test_loopback_http_allowed_with_warning(self) -> None:
        """#37: plain http is accepted for loopback hosts, with a warning."""
        metadata = self.successResultOf(self.source().get())
        self.assertTrue(metadata.loopback_http)
        self.assertIn("development and tests only", self.logged())


class UnavailableTests(DiscoveryTestCase):
    def test_unreachable_then_retry(self) -> None:
        self.provider.misbehave("discovery", "error_500")
        source = self.source()
        failure = self.failureResultOf(source.get(), ProviderUnavailableError)
        self.assertEqual(failure.value.status, 503)
        # Within the retry pause: fail fast, no request.
        self.failureResultOf(source.get(), ProviderUnavailableError)
        self.assertEqual(self.provider.hits["discovery"], 1)
        self.clock.advance(10)
        self.provider.behave()
        self.successResultOf(source.get())
        self.assertEqual(self.provider.hits["discovery"], 2)

    def test_timeout_is_unavailable(self) -> None:
        self.provider.misbehave("discovery", "stall")
        d = self.source().get()
        self.assertNoResult(d)
        self.clock.advance(5)
        self.failureResultOf(d, ProviderUnavailableError)
        self.stub.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_garbled_is_unavailable(self) -> None:
        self.provider.misbehave("discovery", "garbled")
        self.failureResultOf(self.source().get(), ProviderUnavailableError)
