"""
The method registry: the only way a request reaches Python code.

A name is looked up in a dictionary, never resolved through attributes
(Toto's ``getattr`` chains let ``a.__init__.__globals__`` through).  Methods are
added explicitly: by `MethodRegistry.add`, by marking functions with
`method` in a module the registry loads, or as Toto-style method modules
(a module ``<package>.account.create`` with a function ``invoke``).

A method is called as ``function(handler, parameters)`` when its second
parameter is named ``parameters`` (Toto's convention), and otherwise as
``function(handler, **parameters)``, in which case the parameters are checked
against its signature (names, required ones, and simple type annotations).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import typing
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar, Union

import attr

from twistauth.errors import InvalidParametersError, UnknownMethodError

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*\Z")
_MARK = "__twistauth_method__"
_SIMPLE_TYPES: Dict[Any, Tuple[type, ...]] = {
    str: (str,),
    int: (int,),
    float: (int, float),
    bool: (bool,),
    list: (list,),
    dict: (dict,),
    type(None): (type(None),),
}

F = TypeVar("F", bound=Callable[..., Any])


def method(name: str, **options: Any) -> Callable[[F], F]:
    """
    Mark a function as the JSON method ``name``.  Marking registers nothing:
    the function is registered when a `MethodRegistry` loads its module
    (the ``method_modules`` setting) or adds it with `MethodRegistry.add`.

    :param options: stored on the method for later layers (e.g. ``roles``).
    """
    check_name(name)

    def mark(function: F) -> F:
        setattr(function, _MARK, (name, options))
        return function

    return mark


def check_name(name: str) -> str:
    """
    A method name is dotted identifiers, none starting with ``_``.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"invalid method name {name!r}: use dotted identifiers such as "
            f"'account.create' (letters, digits, '_'; no part may start with '_')"
        )
    return name


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Parameter:
    """
    A declared parameter of a keyword-style method.
    """

    name: str
    required: bool
    types: Optional[Tuple[type, ...]]
    """Accepted Python types of the decoded value, or ``None`` for any."""
    annotation: str


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Method:
    """
    A registered method.
    """

    name: str
    function: Callable[..., Any]
    doc: str
    takes_dict: bool
    """Toto style: called as ``function(handler, parameters)``."""
    parameters: Tuple[Parameter, ...]
    accepts_extra: bool
    """The function has ``**kwargs``: unknown parameter names are passed on."""
    options: Dict[str, Any] = attr.ib(factory=dict)

    def invoke(self, handler: Any, parameters: Dict[str, Any]) -> Any:
        """
        Check ``parameters`` and call the function.

        :raises InvalidParametersError: a missing, unknown or mistyped parameter.
        """
        if self.takes_dict:
            return self.function(handler, parameters)
        if not self.parameters and not parameters:
            return self.function(handler)
        for p in self.parameters:
            if p.name in parameters:
                if p.types is not None and not _is_instance(parameters[p.name], p.types):
                    raise InvalidParametersError(
                        f"parameter {p.name!r} of {self.name!r} must be {p.annotation}, "
                        f"got {_json_type(parameters[p.name])}"
                    )
            elif p.required:
                raise InvalidParametersError(f"method {self.name!r} needs the parameter {p.name!r}")
        if not self.accepts_extra:
            known = {p.name for p in self.parameters}
            unknown = sorted(set(parameters) - known)
            if unknown:
                takes = ", ".join(sorted(known)) or "no parameters"
                raise InvalidParametersError(
                    f"method {self.name!r} has no parameter {unknown[0]!r}; it takes {takes}"
                )
        return self.function(handler, **parameters)

    def describe(self) -> Dict[str, Any]:
        """
        The introspection record: name, docstring and parameters.
        """
        return {
            "name": self.name,
            "doc": self.doc,
            "parameters": [
                {"name": p.name, "required": p.required, "type": p.annotation}
                for p in self.parameters
            ],
        }


def _is_instance(value: Any, types: Tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def _json_type(value: Any) -> str:
    return {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        list: "an array",
        dict: "an object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _types_for(annotation: Any) -> Optional[Tuple[type, ...]]:
    """
    The decoded JSON types an annotation accepts, or ``None`` to accept anything.
    """
    if annotation in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[annotation]
    origin = typing.get_origin(annotation)
    if origin in (list, dict):
        return (origin,)
    if origin is Union:
        accepted: Tuple[type, ...] = ()
        for arg in typing.get_args(annotation):
            types = _types_for(arg)
            if types is None:
                return None
            accepted += types
        return accepted
    return None


def describe_function(
    name: str, function: Callable[..., Any], options: Optional[Dict[str, Any]] = None
) -> Method:
    """
    Inspect ``function`` and build its `Method`.

    :raises TypeError: the function cannot be called as a method.
    """
    check_name(name)
    if not callable(function):
        raise TypeError(f"method {name!r}: {function!r} is not callable")
    signature = inspect.signature(function)
    params = list(signature.parameters.values())
    if not params or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise TypeError(
            f"method {name!r}: {function.__qualname__} must take the handler as its "
            f"first positional parameter"
        )
    rest = params[1:]
    doc = inspect.cleandoc(function.__doc__ or "")
    if (
        len(rest) == 1
        and rest[0].name == "parameters"
        and rest[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ):
        return Method(name, function, doc, True, (), True, dict(options or {}))
    try:
        hints = typing.get_type_hints(function)
    except Exception:
        hints = {}
    declared: List[Parameter] = []
    extra = False
    for p in rest:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            extra = True
            continue
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            raise TypeError(f"method {name!r}: parameter {p.name!r} must be passable by keyword")
        hint = hints.get(p.name, inspect.Parameter.empty)
        types = None if hint is inspect.Parameter.empty else _types_for(hint)
        shown = "any" if hint is inspect.Parameter.empty else _annotation_text(hint)
        declared.append(Parameter(p.name, p.default is inspect.Parameter.empty, types, shown))
    return Method(name, function, doc, False, tuple(declared), extra, dict(options or {}))


def _annotation_text(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


class MethodRegistry:
    """
    The methods a server answers, by name.
    """

    def __init__(self) -> None:
        self._methods: Dict[str, Method] = {}

    def add(self, name: str, function: Callable[..., Any], **options: Any) -> Method:
        """
        Register ``function`` as the method ``name``.

        Adding the same function under the same name again changes nothing
        (so loading a module twice, or building two apps on one registry, is
        harmless).

        :raises ValueError: the name is invalid or taken by another function.
        :raises TypeError: the function cannot be called as a method.
        """
        if name in self._methods:
            existing = self._methods[name].function
            if existing is function:
                return self._methods[name]
            raise ValueError(
                f"method {name!r} is registered twice: {_where(existing)} and {_where(function)}"
            )
        registered = describe_function(name, function, options)
        self._methods[name] = registered
        return registered

    def method(self, name: str, **options: Any) -> Callable[[F], F]:
        """
        A decorator that registers the function it decorates at once.
        """

        def register(function: F) -> F:
            self.add(name, function, **options)
            return function

        return register

    def load(self, module_name: str) -> List[str]:
        """
        Register the methods of a module and, if it is a package, of every
        module below it: functions marked with `method`, and Toto-style
        method modules (``invoke`` in a module named after the method).

        :return: the names registered, in order.
        :raises ImportError: the module cannot be imported.
        """
        root = importlib.import_module(module_name)
        modules: List[Tuple[Optional[str], ModuleType]] = [(None, root)]
        if hasattr(root, "__path__"):
            for info in pkgutil.walk_packages(root.__path__, prefix=module_name + "."):
                modules.append(
                    (info.name[len(module_name) + 1 :], importlib.import_module(info.name))
                )
        added: List[str] = []
        for relative, module in modules:
            invoke = getattr(module, "invoke", None)
            if relative is not None and callable(invoke):
                added.append(self.add(relative, invoke).name)
            for value in list(vars(module).values()):
                mark = getattr(value, _MARK, None)
                if mark is not None and getattr(value, "__module__", None) == module.__name__:
                    name, options = mark
                    added.append(self.add(name, value, **options).name)
        return added

    def get(self, name: str) -> Method:
        """
        :raises UnknownMethodError: nothing is registered under ``name``.
        """
        try:
            return self._methods[name]
        except (KeyError, TypeError):
            raise UnknownMethodError(f"no method named {str(name)[:100]!r}") from None

    def lookup(self, name: str) -> Optional[Method]:
        """
        The method called ``name``, or ``None``: the fast path of dispatch.
        """
        return self._methods.get(name)

    def names(self) -> List[str]:
        return sorted(self._methods)

    def describe(self) -> List[Dict[str, Any]]:
        """
        Every method's introspection record, sorted by name.
        """
        return [self._methods[name].describe() for name in self.names()]

    def __len__(self) -> int:
        return len(self._methods)


def _where(function: Callable[..., Any]) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', '?')}"
