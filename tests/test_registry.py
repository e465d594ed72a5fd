"""
Tests for `twistauth.methods.registry`: how methods are registered, named,
checked and described, and that nothing outside the registry can be called
(checklist case 84).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import textwrap
from typing import Any, Dict, List, Optional, Union

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twistauth.app import make_app
from twistauth.errors import InvalidParametersError, UnknownMethodError
from twistauth.methods.registry import MethodRegistry, check_name, describe_function, method
from twistauth.testing._client import MethodClient

# Methods at module level, so their (string) annotations resolve.


def typed(
    handler: Any,
    count: int,
    ratio: float,
    flag: bool,
    name: str,
    items: List[int],
    mapping: Dict[str, Any],
    maybe: Optional[int] = None,
    either: Union[int, str] = 0,
    anything: Any = None,
    untyped=None,  # noqa: ANN001 - deliberately unannotated
) -> Dict[str, Any]:
    """
    Takes one parameter of every simple type.
    """
    return {"count": count, "flag": flag}


def toto_style(handler: Any, parameters: Dict[str, Any]) -> Dict[str, Any]:
    """Toto's convention: the whole parameters object."""
    return {"got": parameters}


def with_extra(handler: Any, a: int, **rest: Any) -> Dict[str, Any]:
    """Known ``a`` and anything else."""
    return {"a": a, "rest": rest}


def no_parameters(handler: Any) -> str:
    return "none"


def star_star_parameters(handler: Any, **parameters: Any) -> Dict[str, Any]:
    """Named like Toto's dict, but keyword style."""
    return parameters


PACKAGE_FILES = {
    "__init__.py": '"""A method package."""\n',
    "echo.py": (
        '"""echo"""\n'
        "def invoke(handler, parameters):\n"
        '    """Answer the parameters."""\n'
        "    return parameters\n"
    ),
    "account/__init__.py": "",
    "account/create.py": (
        "def invoke(handler, parameters):\n"
        '    """Create an account."""\n'
        '    return {"created": parameters.get("name")}\n'
    ),
    "account/helpers.py": "def not_a_method(handler, parameters):\n    return 1\n",
    "marked.py": (
        "from twistauth.methods.registry import method\n"
        '@method("math.add", roles=["user"])\n'
        "def add(handler, a: int, b: int = 1):\n"
        '    """Add two integers."""\n'
        "    return a + b\n"
        "def helper(handler, parameters):\n"
        "    return 0\n"
    ),
    "reexport.py": "from {package}.marked import add  # must not register it twice\n",
}


class _Package(SynchronousTestCase):
    """
    Writes a fresh method package into a temporary directory on sys.path.
    """

    counter = 0

    def make_package(self, files: Dict[str, str]) -> str:
        _Package.counter += 1
        name = f"twistauth_test_methods_{os.getpid()}_{_Package.counter}"
        root = tempfile.mkdtemp(prefix="twistauth-registry-")
        self.addCleanup(shutil.rmtree, root, True)
        for relative, text in files.items():
            path = os.path.join(root, name, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(textwrap.dedent(text.replace("{package}", name)))
        sys.path.insert(0, root)

        def forget() -> None:
            sys.path.remove(root)
            for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[module]

        self.addCleanup(forget)
        return name


class LoadTests(_Package):
    def test_load_package(self) -> None:
        """
        Toto modules (``invoke`` in a module named after the method) and
        functions marked with `method` are registered; nothing else is.
        """
        package = self.make_package(PACKAGE_FILES)
        registry = MethodRegistry()
        added = registry.load(package)
        self.assertEqual(sorted(added), ["account.create", "echo", "math.add"])
        self.assertEqual(registry.names(), ["account.create", "echo", "math.add"])
        self.assertEqual(registry.get("math.add").options, {"roles": ["user"]})
        self.assertEqual(registry.get("account.create").doc, "Create an account.")
        self.assertEqual(
            registry.get("account.create").invoke(None, {"name": "ann"}), {"created": "ann"}
        )
        self.assertEqual(registry.get("math.add").invoke(None, {"a": 2}), 3)

    def test_load_single_module(self) -> None:
        """
        A plain module contributes its marked functions; a module's own
        ``invoke`` is a method only below a package.
        """
        package = self.make_package(PACKAGE_FILES)
        registry = MethodRegistry()
        self.assertEqual(registry.load(package + ".marked"), ["math.add"])
        self.assertEqual(registry.load(package + ".echo"), [])

    def test_load_demo_methods(self) -> None:
        registry = MethodRegistry()
        self.assertEqual(sorted(registry.load("twistauth.demo_methods")), ["echo", "time.now"])

    def test_load_missing_module(self) -> None:
        with self.assertRaises(ImportError):
            MethodRegistry().load("twistauth_no_such_package_here")

    def test_duplicate_in_package(self) -> None:
        """
        A marked function and a method module with the same name clash at
        load time, naming both.
        """
        files = dict(PACKAGE_FILES)
        files["clash.py"] = (
            "from twistauth.methods.registry import method\n"
            '@method("echo")\n'
            "def echo_again(handler):\n"
            "    return 1\n"
        )
        package = self.make_package(files)
        with self.assertRaises(ValueError) as caught:
            MethodRegistry().load(package)
        self.assertIn("'echo' is registered twice", str(caught.exception))
        self.assertIn("echo_again", str(caught.exception))

    def test_duplicate_add(self) -> None:
        registry = MethodRegistry()
        registry.add("a.b", no_parameters)
        with self.assertRaises(ValueError):
            registry.add("a.b", typed)
        self.assertIs(registry.get("a.b").function, no_parameters)

    def test_loading_twice_is_harmless(self) -> None:
        registry = MethodRegistry()
        first = registry.load("twistauth.demo_methods")
        registry.load("twistauth.demo_methods")
        self.assertEqual(registry.names(), sorted(first))

    def test_another_function_under_a_taken_name_is_refused(self) -> None:
        registry = MethodRegistry()
        registry.load("twistauth.demo_methods")
        with self.assertRaises(ValueError):
            registry.add("echo", lambda handler, parameters: parameters)

    def test_decorator_on_registry(self) -> None:
        registry = MethodRegistry()

        @registry.method("now.here", roles=["admin"])
        def here(handler: Any) -> int:
            return 1

        self.assertIs(registry.get("now.here").function, here)
        self.assertEqual(registry.get("now.here").options, {"roles": ["admin"]})
        self.assertEqual(len(registry), 1)

    def test_marking_registers_nothing(self) -> None:
        registry = MethodRegistry()

        @method("marked.only")
        def marked(handler: Any) -> int:
            return 1

        self.assertIsNone(registry.lookup("marked.only"))
        self.assertEqual(marked(None), 1)


class NameTests(SynchronousTestCase):
    BAD = [
        "",
        "_x",
        "a._b",
        "__class__",
        "a.__init__.__globals__",
        ".a",
        "a.",
        "a..b",
        "1a",
        "a-b",
        "a b",
        "a/b",
        "\u00e9cho",
        "echo\n",
    ]

    def test_invalid_names(self) -> None:
        for name in self.BAD:
            with self.assertRaises(ValueError, msg=repr(name)):
                check_name(name)
            with self.assertRaises(ValueError, msg=repr(name)):
                MethodRegistry().add(name, no_parameters)
            with self.assertRaises(ValueError, msg=repr(name)):
                method(name)
        with self.assertRaises(ValueError):
            check_name(None)  # type: ignore[arg-type]

    def test_valid_names(self) -> None:
        for name in ("echo", "a.b", "account.create", "A1.b_2", "x_"):
            self.assertEqual(check_name(name), name)

    def test_unknown(self) -> None:
        registry = MethodRegistry()
        with self.assertRaises(UnknownMethodError):
            registry.get("nope")
        with self.assertRaises(UnknownMethodError):
            registry.get(None)  # type: ignore[arg-type]
        with self.assertRaises(UnknownMethodError):
            registry.get(["echo"])  # type: ignore[arg-type]
        self.assertIsNone(registry.lookup("nope"))


class NoAttributeWalkingTests(SynchronousTestCase):
    """
    Case 84: names resolve only through the registry's dictionary.
    """

    PROBES = [
        "__class__",
        "a.__init__.__globals__",
        "echo.__globals__",
        "echo.invoke",
        "echo.__call__",
        "echo.__dict__",
        "echo.__module__",
        "invoke",
        "time",
        "time.now.__globals__",
        "time.now.invoke",
        "twistauth.demo_methods.echo",
        "demo_methods.echo",
        "__import__",
        "os.system",
        "constructor",
        "__proto__",
        "echo.",
        ".echo",
        "ECHO",
        "echo ",
    ]

    def setUp(self) -> None:
        self.client = MethodClient(make_app(clock=Clock()))

    def test_probes_are_unknown_methods(self) -> None:
        for name in self.PROBES:
            failure = self.failureResultOf(self.client.call(name), UnknownMethodError)
            value = failure.value.value
            self.assertIn("no method named", value, name)
            for leak in ("function", "module", "object at", "Traceback", "/"):
                self.assertNotIn(leak, value.replace(repr(name[:100]), ""), name)

    def test_probes_in_a_batch(self) -> None:
        answers = self.successResultOf(
            self.client.batch({str(i): (name, {}) for i, name in enumerate(self.PROBES[:20])})
        )
        for answer in answers.values():
            self.assertIsInstance(answer, UnknownMethodError)

    def test_registered_methods_still_answer(self) -> None:
        self.assertEqual(self.successResultOf(self.client.call("echo", x=1)), {"x": 1})


class ParameterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = MethodRegistry()
        self.typed = self.registry.add("typed", typed)
        self.good: Dict[str, Any] = {
            "count": 1,
            "ratio": 0.5,
            "flag": True,
            "name": "n",
            "items": [1],
            "mapping": {},
        }

    def invalid(self, parameters: Dict[str, Any], *fragments: str) -> None:
        with self.assertRaises(InvalidParametersError) as caught:
            self.typed.invoke(None, parameters)
        for fragment in fragments:
            self.assertIn(fragment, str(caught.exception))

    def test_good(self) -> None:
        self.assertEqual(self.typed.invoke(None, self.good), {"count": 1, "flag": True})

    def test_missing(self) -> None:
        for name in ("count", "ratio", "flag", "name", "items", "mapping"):
            parameters = dict(self.good)
            del parameters[name]
            self.invalid(parameters, f"needs the parameter {name!r}")

    def test_unknown(self) -> None:
        self.invalid(dict(self.good, extra=1), "no parameter 'extra'", "count")

    def test_wrong_types(self) -> None:
        for name, value, said in [
            ("count", "1", "a string"),
            ("count", 1.5, "a number"),
            ("count", True, "a boolean"),
            ("ratio", "0.5", "a string"),
            ("ratio", False, "a boolean"),
            ("flag", 1, "an integer"),
            ("flag", None, "null"),
            ("name", 5, "an integer"),
            ("items", {}, "an object"),
            ("mapping", [], "an array"),
            ("maybe", "x", "a string"),
            ("maybe", True, "a boolean"),
            ("either", 1.5, "a number"),
            ("either", None, "null"),
        ]:
            self.invalid(dict(self.good, **{name: value}), f"{name!r}", said)

    def test_accepted_widenings(self) -> None:
        """
        An integer is a number; ``Optional`` accepts null; an unannotated or
        ``Any`` parameter takes anything.
        """
        for extra in (
            {"ratio": 3},
            {"maybe": None},
            {"maybe": 4},
            {"either": "s"},
            {"anything": [1, {"a": None}]},
            {"untyped": {"x": 1}},
        ):
            self.typed.invoke(None, dict(self.good, **extra))

    def test_toto_style_gets_the_dict(self) -> None:
        registered = self.registry.add("toto", toto_style)
        self.assertTrue(registered.takes_dict)
        given = {"anything": 1, "at": ["all"]}
        self.assertEqual(registered.invoke(None, given), {"got": given})

    def test_kwargs_accepts_extra(self) -> None:
        registered = self.registry.add("extra", with_extra)
        self.assertEqual(registered.invoke(None, {"a": 1, "b": 2}), {"a": 1, "rest": {"b": 2}})
        with self.assertRaises(InvalidParametersError):
            registered.invoke(None, {"b": 2})
        with self.assertRaises(InvalidParametersError):
            registered.invoke(None, {"a": "1"})

    def test_star_star_parameters_is_keyword_style(self) -> None:
        """
        ``**parameters`` is not Toto's positional ``parameters``.
        """
        registered = self.registry.add("starstar", star_star_parameters)
        self.assertFalse(registered.takes_dict)
        self.assertEqual(registered.invoke(None, {"a": 1}), {"a": 1})
        self.assertEqual(registered.invoke(None, {}), {})

    def test_no_parameters(self) -> None:
        registered = self.registry.add("none", no_parameters)
        self.assertEqual(registered.invoke(None, {}), "none")
        with self.assertRaises(InvalidParametersError) as caught:
            registered.invoke(None, {"x": 1})
        self.assertIn("no parameters", str(caught.exception))

    def test_unusable_functions(self) -> None:
        def no_handler() -> None:
            pass

        def keyword_handler(*, handler: Any) -> None:
            pass

        def star_args(handler: Any, *args: Any) -> None:
            pass

        def positional_only(handler: Any, a: int, /) -> None:
            pass

        for function in (no_handler, keyword_handler, star_args, positional_only):
            with self.assertRaises(TypeError, msg=function.__name__):
                describe_function("x", function)
        with self.assertRaises(TypeError):
            describe_function("x", "not callable")  # type: ignore[arg-type]


class IntrospectionTests(SynchronousTestCase):
    def test_describe(self) -> None:
        registry = MethodRegistry()
        registry.add("typed", typed)
        registry.add("toto", toto_style)
        described = {d["name"]: d for d in registry.describe()}
        self.assertEqual([d["name"] for d in registry.describe()], ["toto", "typed"])
        self.assertEqual(described["typed"]["doc"], "Takes one parameter of every simple type.")
        parameters = {p["name"]: p for p in described["typed"]["parameters"]}
        self.assertEqual(
            list(parameters),
            ["count", "ratio", "flag", "name", "items", "mapping", "maybe", "either",
             "anything", "untyped"],
        )
        self.assertEqual(parameters["count"], {"name": "count", "required": True, "type": "int"})
        self.assertFalse(parameters["maybe"]["required"])
        self.assertEqual(parameters["untyped"]["type"], "any")
        self.assertEqual(described["toto"]["parameters"], [])

    def test_get_lists_methods_over_http(self) -> None:
        """
        ``GET /api`` answers every method's name, docstring and parameters.
        """
        registry = MethodRegistry()
        registry.add("typed", typed)
        client = MethodClient(make_app(clock=Clock(), registry=registry))
        response = self.successResultOf(client.request("GET"))
        self.assertEqual(response.status, 200)
        listed = {d["name"]: d for d in response.decoded()["result"]}
        self.assertLessEqual({"echo", "time.now", "typed"}, set(listed))
        self.assertEqual(list(listed), sorted(listed))
        self.assertIn("Answer the parameters", listed["echo"]["doc"])
        self.assertEqual(
            [p["name"] for p in listed["typed"]["parameters"]][:3], ["count", "ratio", "flag"]
        )
