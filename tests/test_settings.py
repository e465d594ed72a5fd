"""
Tests for `twistauth.settings` and the twistd options built from it: the
five sources and their precedence, and every way a value can be refused.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from typing import Any, Dict, Optional

from conftest import source_environ, twistd_executable
from twisted.trial.unittest import SynchronousTestCase

from twistauth.settings import ENV_PREFIX, Settings, SettingsError, documented_keys
from twistauth.tap import Options

KEY = bytes(range(32))
KEY_TEXT = base64.urlsafe_b64encode(KEY).decode().rstrip("=")


class _Files(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="twistauth-settings-")
        self.addCleanup(shutil.rmtree, self.directory, True)

    def write(self, name: str, content: Any) -> str:
        path = os.path.join(self.directory, name)
        data = content if isinstance(content, bytes) else textwrap.dedent(content).encode()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def refused(self, key: Optional[str], source_part: str, **load: Any) -> SettingsError:
        """
        Load, expect a `SettingsError` for ``key`` whose message names the
        key and the source, and return it.
        """
        with self.assertRaises(SettingsError) as caught:
            Settings.load(**load)
        error = caught.exception
        self.assertEqual(error.key, key)
        self.assertIn(source_part, error.source)
        self.assertIn(source_part, str(error))
        if key is not None:
            self.assertIn(repr(key), str(error))
        return error


class PrecedenceTests(_Files):
    """
    defaults < TOML < environment < command line < keywords, per key.
    """

    def sources(self) -> Dict[str, Any]:
        return {
            "config_path": self.write("a.toml", "max_body_bytes = 1000\n"),
            "environ": {"TWISTAUTH_MAX_BODY_BYTES": "2000"},
            "command_line": {"max_body_bytes": "3000"},
            "max_body_bytes": 4000,
        }

    def test_each_source_overrides_the_ones_below(self) -> None:
        """
        Dropping the highest source in turn reveals the next lower one.
        """
        sources = self.sources()
        expected = [
            (4000, "Python keyword"),
            (3000, "command-line option --max-body-bytes"),
            (2000, "environment variable TWISTAUTH_MAX_BODY_BYTES"),
            (1000, "config file "),
            (64 * 1024, "default"),
        ]
        order = ["max_body_bytes", "command_line", "environ", "config_path"]
        for value, origin in expected:
            settings = Settings.load(**sources)
            self.assertEqual(settings.max_body_bytes, value)
            self.assertTrue(settings.origins["max_body_bytes"].startswith(origin), origin)
            if order:
                del sources[order.pop(0)]

    def test_per_key(self) -> None:
        """
        Each key takes its value from the highest source that gives it, and
        the origin of each is recorded separately.
        """
        hook = "json:dumps"
        config = self.write(
            "a.toml",
            """
            max_body_bytes = 1000
            max_batch_size = 5
            request_timeout = 7
            api_path = "/toml"
            listen = ["tcp:1001"]
            """,
        )
        settings = Settings.load(
            config_path=config,
            environ={
                "TWISTAUTH_MAX_BATCH_SIZE": "6",
                "TWISTAUTH_REQUEST_TIMEOUT": "8.5",
                "TWISTAUTH_API_PATH": "/env",
                "TWISTAUTH_LISTEN": "tcp:2001,tcp:2002",
                "UNRELATED": "x",
            },
            command_line={"request_timeout": "9", "api_path": "/cli", "listen": ["tcp:3001"]},
            api_path="/kw",
            exception_hook=hook,
        )
        self.assertEqual(settings.max_body_bytes, 1000)
        self.assertEqual(settings.max_batch_size, 6)
        self.assertEqual(settings.request_timeout, 9.0)
        self.assertEqual(settings.api_path, "/kw")
        self.assertEqual(settings.listen, ("tcp:3001",))
        self.assertIs(settings.exception_hook, json.dumps)
        self.assertEqual(settings.max_json_depth, 32)
        origins = settings.origins
        self.assertEqual(origins["max_body_bytes"], f"config file {config}")
        self.assertEqual(origins["max_batch_size"], "environment variable TWISTAUTH_MAX_BATCH_SIZE")
        self.assertEqual(origins["request_timeout"], "command-line option --request-timeout")
        self.assertEqual(origins["api_path"], "Python keyword")
        self.assertEqual(origins["listen"], "command-line option --listen")
        self.assertEqual(origins["exception_hook"], "Python keyword")
        self.assertEqual(origins["max_json_depth"], "default")

    def test_repeatable_from_environment_and_command_line(self) -> None:
        """
        A list key is comma-separated in the environment; on the command
        line each repetition adds, and a repetition may hold commas too.
        """
        from_env = Settings.load(environ={"TWISTAUTH_LISTEN": "tcp:1, tcp:2"})
        self.assertEqual(from_env.listen, ("tcp:1", "tcp:2"))
        from_cli = Settings.load(command_line={"listen": ["tcp:3", "tcp:4,tcp:5"]})
        self.assertEqual(from_cli.listen, ("tcp:3", "tcp:4", "tcp:5"))

    def test_defaults(self) -> None:
        """
        With no source every key is its default, and every default is a
        value its own kind accepts.
        """
        settings = Settings.load()
        for name, field in Settings.keys().items():
            self.assertEqual(settings.origins[name], "default")
            if field.default is not None:
                self.assertEqual(field.metadata["kind"].check(field.default), field.default, name)
        self.assertEqual(settings.listen, ("tcp:8080",))
        self.assertEqual(settings.api_path, "/api")

    def test_environment_ignores_config_variable(self) -> None:
        """
        ``TWISTAUTH_CONFIG`` names the file; it is not a setting.
        """
        settings = Settings.load(environ={"TWISTAUTH_CONFIG": "/nowhere.toml"})
        self.assertNotIn("config", settings.origins)

    def test_every_key_documented(self) -> None:
        documented = list(documented_keys())
        self.assertEqual([d[0] for d in documented], list(Settings.keys()))
        for name, allowed, doc, _default, _example in documented:
            self.assertTrue(allowed and doc, name)

    def test_secrets_never_shown(self) -> None:
        """
        Keys appear neither in `Settings.describe` (start-up log lines) nor
        in the settings' repr (tracebacks, debug logs).
        """
        secret = [
            (name, field.metadata["kind"])
            for name, field in Settings.keys().items()
            if field.metadata["kind"].secret
        ]
        self.assertIn("deployment_key", [name for name, _ in secret])
        for name, kind in secret:
            settings = Settings.load(**{name: [KEY] if kind.repeatable else KEY})
            described = settings.describe(name)
            self.assertTrue(described.endswith(" (Python keyword)"), described)
            for shown in (described, repr(settings), str(settings)):
                self.assertNotIn(KEY_TEXT, shown)
                self.assertNotIn(repr(KEY)[2:20], shown)
        self.assertEqual(settings.describe("listen"), "tcp:8080 (default)")


class RefusalTests(_Files):
    """
    A bad value is refused with a message naming the key and its source.
    """

    def test_unknown_key_toml_did_you_mean(self) -> None:
        path = self.write("a.toml", "max_body_byte = 10\n")
        error = self.refused("max_body_byte", "config file", config_path=path)
        self.assertIn("did you mean 'max_body_bytes'?", str(error))

    def test_unknown_key_environment(self) -> None:
        error = self.refused(
            "listn", "environment variable TWISTAUTH_LISTN", environ={"TWISTAUTH_LISTN": "x"}
        )
        self.assertIn("did you mean 'listen'?", str(error))

    def test_unknown_key_keyword_without_close_match(self) -> None:
        error = self.refused("zzzz", "Python keyword", zzzz=1)
        self.assertIn("unknown setting", str(error))
        self.assertNotIn("did you mean", str(error))

    def test_unknown_key_command_line(self) -> None:
        self.refused("max_bodybytes", "command-line option", command_line={"max_bodybytes": "1"})

    def test_wrong_type_toml(self) -> None:
        path = self.write("a.toml", 'max_body_bytes = "big"\n')
        error = self.refused("max_body_bytes", "config file", config_path=path)
        self.assertIn("expected an integer", str(error))

    def test_bool_is_not_an_integer(self) -> None:
        path = self.write("a.toml", "max_batch_size = true\n")
        self.refused("max_batch_size", "config file", config_path=path)
        self.refused("request_timeout", "Python keyword", request_timeout=True)

    def test_wrong_type_keyword(self) -> None:
        self.refused("request_timeout", "Python keyword", request_timeout="5")
        self.refused("listen", "Python keyword", listen="tcp:8080")
        self.refused("api_path", "Python keyword", api_path=5)

    def test_wrong_type_environment(self) -> None:
        error = self.refused(
            "max_json_depth", "TWISTAUTH_MAX_JSON_DEPTH", environ={"TWISTAUTH_MAX_JSON_DEPTH": "ten"}
        )
        self.assertIn("'ten'", str(error))

    def test_out_of_range(self) -> None:
        self.refused("max_body_bytes", "Python keyword", max_body_bytes=0)
        self.refused("max_body_bytes", "Python keyword", max_body_bytes=16 * 1024 * 1024 + 1)
        self.refused("max_json_depth", "command-line", command_line={"max_json_depth": "1000"})
        self.refused("request_timeout", "command-line", command_line={"request_timeout": "0"})
        for text in ("nan", "inf", "-1"):
            self.refused("idle_timeout", "environment", environ={"TWISTAUTH_IDLE_TIMEOUT": text})

    def test_bad_endpoint(self) -> None:
        for bad in ("tcp:notaport", "nosuchtype:1", "", "tcp:8080:bogus=1"):
            error = self.refused("listen", "Python keyword", listen=[bad])
            self.assertIn("Twisted server endpoint", str(error))

    def test_bad_endpoint_environment(self) -> None:
        self.refused("listen", "TWISTAUTH_LISTEN", environ={"TWISTAUTH_LISTEN": "tcp:1,tcp:x"})

    def test_bad_api_path(self) -> None:
        for bad in ("api", "/api/", "/", "/api?x=1", "/api#f", "", "/\u00e4pi", "/a pi", "//api"):
            error = self.refused("api_path", "Python keyword", api_path=bad)
            self.assertIn("URL path", str(error))

    def test_nested_api_path_allowed(self) -> None:
        self.assertEqual(Settings.load(api_path="/v1/api").api_path, "/v1/api")

    def test_toml_syntax_error(self) -> None:
        path = self.write("a.toml", "max_body_bytes = = 3\n")
        error = self.refused(None, "config file", config_path=path)
        self.assertIn("not valid TOML", str(error))

    def test_toml_not_utf8(self) -> None:
        path = self.write("a.toml", b'api_path = "/\xff"\n')
        error = self.refused(None, "config file", config_path=path)
        self.assertIn("not valid TOML", str(error))

    def test_unreadable_file(self) -> None:
        missing = os.path.join(self.directory, "missing.toml")
        error = self.refused(None, f"config file {missing}", config_path=missing)
        self.assertIn("cannot be read", str(error))
        self.refused(None, "config file", config_path=self.directory)

    def test_table_in_toml(self) -> None:
        path = self.write("a.toml", "[server]\nlisten = ['tcp:1']\n")
        error = self.refused("server", "config file", config_path=path)
        self.assertIn("tables are not settings", str(error))

    def test_array_of_tables_in_toml(self) -> None:
        path = self.write("a.toml", "[[listen]]\nport = 1\n")
        self.refused("listen", "config file", config_path=path)


class SecretTests(_Files):
    def test_file_secret(self) -> None:
        path = self.write("key", KEY_TEXT + "\n")
        settings = Settings.load(environ={"TWISTAUTH_DEPLOYMENT_KEY": f"file:{path}"})
        self.assertEqual(settings.deployment_key, KEY)

    def test_inline_secret_padded_or_not(self) -> None:
        padded = base64.urlsafe_b64encode(KEY).decode()
        for text in (KEY_TEXT, padded):
            self.assertEqual(Settings.load(deployment_key=text).deployment_key, KEY)
        self.assertEqual(Settings.load(deployment_key=KEY).deployment_key, KEY)

    def test_file_secret_missing(self) -> None:
        missing = os.path.join(self.directory, "nokey")
        error = self.refused(
            "deployment_key",
            "command-line option --deployment-key",
            command_line={"deployment_key": f"file:{missing}"},
        )
        self.assertIn("cannot read the key file", str(error))

    def test_file_secret_wrong_length(self) -> None:
        short = base64.urlsafe_b64encode(b"x" * 16).decode()
        path = self.write("key", short)
        error = self.refused("deployment_key", "config file", config_path=self.write(
            "a.toml", f'deployment_key = "file:{path}"\n'
        ))
        self.assertIn("decodes to 16 bytes", str(error))
        self.assertNotIn(short, str(error))

    def test_secret_not_base64(self) -> None:
        self.refused("deployment_key", "Python keyword", deployment_key="not base64 at all!")
        self.refused("deployment_key", "Python keyword", deployment_key="\u00e9" * 43)
        self.refused("deployment_key", "Python keyword", deployment_key=b"short")


def broken_import_hook() -> None:
    """Never called: the module below fails while importing."""


class HookTests(_Files):
    def test_hook_by_dotted_name(self) -> None:
        for source in ({"environ": {"TWISTAUTH_AFTER_HOOK": "os.path:join"}},
                       {"command_line": {"after_hook": "os.path:join"}},
                       {"after_hook": "os.path:join"}):
            self.assertIs(Settings.load(**source).after_hook, os.path.join)

    def test_hook_as_object(self) -> None:
        def hook(transaction: Any) -> None:
            pass

        self.assertIs(Settings.load(before_hook=hook).before_hook, hook)

    def test_bad_hooks(self) -> None:
        for bad, why in [
            ("os.path", "'package.module:name'"),
            ("os.path:", "'package.module:name'"),
            ("no_such_module_here:x", "cannot import"),
            ("os.path:no_such_name", "cannot import"),
            ("os:sep", "is not callable"),
            ("1bad:x", "dotted module name"),
        ]:
            error = self.refused(
                "exception_hook",
                "TWISTAUTH_EXCEPTION_HOOK",
                environ={"TWISTAUTH_EXCEPTION_HOOK": bad},
            )
            self.assertIn(why, str(error))
        self.refused("before_hook", "Python keyword", before_hook=42)

    def test_hook_module_fails_to_import(self) -> None:
        """
        A hook's module that raises while importing is a bad setting, not a
        crash.
        """
        self.write("twistauth_broken_hook_module.py", "raise RuntimeError('boom')\n")
        sys.path.insert(0, self.directory)
        self.addCleanup(sys.path.remove, self.directory)
        self.addCleanup(sys.modules.pop, "twistauth_broken_hook_module", None)
        error = self.refused(
            "exception_hook", "Python keyword", exception_hook="twistauth_broken_hook_module:f"
        )
        self.assertIn("boom", str(error))


class OptionsTests(_Files):
    """
    The twistd options: every key is an option, and bad values are usage
    errors that name the key and the option.
    """

    def parse(self, argv: list, environ: Optional[Dict[str, str]] = None) -> Settings:
        self.patch(os, "environ", dict(environ or {}))
        options = Options()
        options.parseOptions(argv)
        return options["settings"]  # type: ignore[no-any-return]

    def test_every_key_is_an_option(self) -> None:
        text = str(Options())
        for name in Settings.keys():
            self.assertIn("--" + name.replace("_", "-"), text)

    def test_bad_value_exits_with_the_message(self) -> None:
        # SystemExit(1) rather than a UsageError: twistd before Twisted 26
        # exits 0 after a UsageError.
        self.patch(os, "environ", {})
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as caught:
            Options().parseOptions(["--max-body-bytes", "abc"])
        self.assertEqual(caught.exception.code, 1)
        message = stderr.getvalue()
        self.assertIn("'max_body_bytes'", message)
        self.assertIn("command-line option --max-body-bytes", message)

    def test_all_sources_through_options(self) -> None:
        config = self.write("a.toml", "max_body_bytes = 1000\nmax_batch_size = 3\n")
        settings = self.parse(
            ["--config", config, "--max-body-bytes", "3000", "--listen", "tcp:1", "--listen",
             "tcp:2"],
            {"TWISTAUTH_MAX_BODY_BYTES": "2000", "TWISTAUTH_MAX_JSON_DEPTH": "9"},
        )
        self.assertEqual(settings.max_body_bytes, 3000)
        self.assertEqual(settings.max_batch_size, 3)
        self.assertEqual(settings.max_json_depth, 9)
        self.assertEqual(settings.listen, ("tcp:1", "tcp:2"))

    def test_config_from_environment(self) -> None:
        config = self.write("a.toml", "max_batch_size = 4\n")
        settings = self.parse([], {ENV_PREFIX + "CONFIG": config})
        self.assertEqual(settings.max_batch_size, 4)
        self.assertEqual(settings.origins["max_batch_size"], f"config file {config}")


class TwistdRefusesTests(SynchronousTestCase):
    def test_bad_option_exits_and_nothing_listens(self) -> None:
        """
        ``twistd -n twistauth --max-body-bytes=abc`` stops before anything
        starts: non-zero exit, the message names key and source, and the
        port it was told to listen on stays closed.
        """
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        directory = tempfile.mkdtemp(prefix="twistauth-twistd-")
        self.addCleanup(shutil.rmtree, directory, True)
        done = subprocess.run(
            [twistd_executable(), "-n", "--pidfile=", "twistauth",
             f"--listen=tcp:{port}:interface=127.0.0.1", "--max-body-bytes=abc"],
            cwd=directory,
            env=source_environ(),
            capture_output=True,
            timeout=30,
        )
        output = (done.stdout + done.stderr).decode()
        self.assertNotEqual(done.returncode, 0, output)
        self.assertIn("setting 'max_body_bytes' from command-line option --max-body-bytes", output)
        self.assertIn("'abc'", output)
        with socket.socket() as s:
            self.assertNotEqual(s.connect_ex(("127.0.0.1", port)), 0)
        self.assertNotIn("Traceback", output)
