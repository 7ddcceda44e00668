"""Checks every TensorRT name a backend's source uses against one release's real TensorRT Python module.

Runs in a subprocess whose `tensorrt_bindings` is that release's module (its bindings wheel on PYTHONPATH,
stand-in libnvinfer*.so on LD_LIBRARY_PATH; tests/unit/test_trt_api.py sets both up):

    python tests/support/trt_api.py  < {"sources": {label: python source, ...}}
    -> {"version": "10.0.1", "data_types": [...], "reports": {label: {"problems", "checked", "probes"}}}

`problems` has one line per misuse, `checked` every TensorRT name the source reaches on this release,
`probes` every hasattr/getattr capability test with its answer here ({"IExecutionContext.set_device_memory":
false}).

How the source is read. `trt` and `tensorrt` name the module. A value is a TensorRT class or instance when it
comes from one: `trt.Builder(logger)` is a Builder, `builder.create_network(flags)` is what the method's
docstring signature returns (`-> ...INetworkDefinition`), a property has the type its getter's docstring
names, and local names, `self.<attr>` and the results of the source's own functions carry those types along.
On such values:
- an attribute that is read must exist, one that is written must be a settable property;
- a call must fit one of the signatures pybind11 wrote into the docstring (positional count, keyword names,
  and the TensorRT class of an argument where both sides name one); `*args`/`**kwargs` are refused, since
  they cannot be checked;
- a class that subclasses a TensorRT class may only override methods the base has, with as many arguments.
Capability guards are evaluated on this release: `if hasattr(obj, "name")` (negated, combined with and/or,
with its else branch), `if not hasattr(...): raise/return` ahead of the rest of a block, `getattr(obj,
"name", default)`, and `a if hasattr(...) else b`. Code a guard makes unreachable here is not checked here.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import sys
from typing import NamedTuple

MODULE_NAMES = ("trt", "tensorrt")


class Param(NamedTuple):
    name: str
    kind: str  # "pos", "posonly", "kwonly", "varargs", "varkw"
    default: bool
    annotation: str


class Value(NamedTuple):
    """What the checker knows about an expression: kind is module, class, instance, method, function (TensorRT),
    probe (a hasattr answer), pyfunc / usercls / userobj (the source's own functions and classes)."""

    kind: str
    obj: object
    name: str = ""
    bound: bool = False


# --------------------------------------------------------------------------- docstring signatures


def split_top(text: str, sep: str = ",") -> list[str]:
    """Split at `sep` outside brackets and quotes (types like Dict[str, int], defaults like <Flag.X: 0>)."""
    parts, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def parse_params(text: str) -> list[Param]:
    params, kind = [], "pos"
    for part in split_top(text):
        if part == "*":
            kind = "kwonly"
        elif part == "/":
            params = [p._replace(kind="posonly") for p in params]
        elif part.startswith("**"):
            params.append(Param(part[2:].split(":")[0].strip(), "varkw", True, ""))
        elif part.startswith("*"):
            params.append(Param(part[1:].split(":")[0].strip(), "varargs", True, ""))
            kind = "kwonly"
        else:
            head, eq, _ = part.partition("=")
            name, _, annotation = head.partition(":")
            params.append(Param(name.strip(), kind, bool(eq), annotation.strip()))
    return params


def signatures(name: str, doc: str | None) -> list[tuple[list[Param], str]]:
    """[(params, return annotation)] of every overload pybind11 wrote into `doc` for `name`."""
    pattern = re.compile(rf"^\s*(?:\d+\.\s*)?{re.escape(name)}\((.*)\)\s*->\s*(.+?)\s*$")
    found = []
    for line in (doc or "").splitlines():
        match = pattern.match(line)
        if match and match.group(1).strip() != "*args, **kwargs":
            found.append((parse_params(match.group(1)), match.group(2)))
    return found


def describe(params: list[Param]) -> str:
    return (
        "("
        + ", ".join(p.name + ("=..." if p.default and p.kind not in ("varargs", "varkw") else "") for p in params)
        + ")"
    )


# --------------------------------------------------------------------------- the checker


class Checker:
    def __init__(self, trt):
        self.trt = trt
        self.prefix = trt.__name__
        self.reporting = False
        self.problems: list[str] = []
        self.checked: set[str] = set()
        self.probes: dict[str, bool] = {}
        self.returns: dict[ast.AST, Value] = {}
        self.class_attrs: dict[str, dict[str, Value]] = {}
        self.scope: ast.AST | None = None  # the function whose returns are being recorded
        self.cls: str | None = None  # the source's own class whose `self` is in scope

    # ---- values

    def is_trt_class(self, obj) -> bool:
        return isinstance(obj, type) and (obj.__module__ or "").startswith(self.prefix)

    def classify(self, obj, name: str) -> Value | None:
        if inspect.ismodule(obj):
            return Value("module", obj)
        if isinstance(obj, type):
            return Value("class", obj)
        if self.is_trt_class(type(obj)):
            return Value("instance", type(obj))
        if callable(obj):
            return Value("function", obj, name)
        return None

    def resolve_type(self, annotation: str) -> type | None:
        """The TensorRT class an annotation names ("tensorrt_bindings.tensorrt.ILogger.Severity"), if any."""
        text = annotation.strip()
        optional = re.fullmatch(r"(?:typing\.)?Optional\[(.*)\]", text)
        text = optional.group(1) if optional else text.removesuffix(" | None")
        if not re.fullmatch(r"[\w.]+", text):
            return None
        parts = text.split(".")
        for start in range(len(parts)):
            obj = self.trt
            for part in parts[start:]:
                obj = getattr(obj, part, None)
            if self.is_trt_class(obj):
                return obj
        return None

    def label(self, value: Value) -> str:
        return "trt" if value.kind == "module" else value.obj.__name__

    def problem(self, node: ast.AST, message: str) -> None:
        if self.reporting:
            self.problems.append(f"line {getattr(node, 'lineno', '?')}: {message}")

    def use(self, name: str) -> None:
        if self.reporting:
            self.checked.add(name)

    # ---- attributes

    def probe(self, target: Value, name: str) -> bool:
        exists = hasattr(target.obj, name)
        if self.reporting:
            self.probes[f"{self.label(target)}.{name}"] = exists
        return exists

    def attribute(self, base: Value, name: str, node: ast.AST, store: bool = False) -> Value | None:
        owner = self.label(base)
        if not hasattr(base.obj, name):
            self.problem(node, f"{owner}.{name} does not exist")
            return None
        self.use(f"{owner}.{name}")
        if base.kind == "module":
            return self.classify(getattr(base.obj, name), name)
        static = inspect.getattr_static(base.obj, name)
        if isinstance(static, property):
            if store and static.fset is None:
                self.problem(node, f"{owner}.{name} is read-only")
            if base.kind == "instance" and static.fget is not None:
                sigs = signatures("", static.fget.__doc__)
                return self.instance_of(sigs[0][1]) if sigs else None
            return None
        if store:
            self.problem(node, f"{owner}.{name} is not a settable property")
            return None
        if callable(static) and not isinstance(static, type) and not self.is_trt_class(type(static)):
            return Value("method", base.obj, name, bound=base.kind == "instance")
        return self.classify(getattr(base.obj, name), name)

    def instance_of(self, annotation: str) -> Value | None:
        cls = self.resolve_type(annotation)
        return Value("instance", cls) if cls is not None else None

    # ---- calls

    def fits(self, params: list[Param], args: list, kwargs: dict) -> bool:
        positional = [p for p in params if p.kind in ("pos", "posonly")]
        if len(args) > len(positional) and not any(p.kind == "varargs" for p in params):
            return False
        given = {p.name: (p, v) for p, v in zip(positional, args, strict=False)}
        for key, value in kwargs.items():
            param = next((p for p in params if p.name == key and p.kind in ("pos", "kwonly")), None)
            if param is None:
                if any(p.kind == "varkw" for p in params):
                    continue
                return False
            if key in given:
                return False
            given[key] = (param, value)
        required = [p for p in params if p.kind in ("pos", "posonly", "kwonly") and not p.default]
        if any(p.name not in given for p in required):
            return False
        for param, value in given.values():
            expected = self.resolve_type(param.annotation)
            if expected is not None and value is not None and value.kind == "instance":
                if not issubclass(value.obj, expected):
                    return False
        return True

    def callable_signatures(self, value: Value) -> tuple[str, list, bool]:
        """(label, signatures, drop the first parameter) for calling `value`."""
        if value.kind == "class":
            init = value.obj.__init__
            return value.obj.__name__, signatures("__init__", init.__doc__), True
        if value.kind == "method":
            doc = getattr(value.obj, value.name).__doc__
            return f"{value.obj.__name__}.{value.name}", signatures(value.name, doc), value.bound
        return f"trt.{value.name}", signatures(value.name, getattr(value.obj, "__doc__", "")), False

    def call(self, node: ast.Call, env: dict) -> Value | None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("hasattr", "getattr") and self.literal_probe(node):
            target = self.expr(node.args[0], env)
            if target is not None and target.kind in ("module", "class", "instance"):
                name = node.args[1].value
                exists = self.probe(target, name)
                if func.id == "hasattr":
                    return Value("probe", exists)
                if len(node.args) == 2 or exists:
                    return self.attribute(target, name, node)
                return self.expr(node.args[2], env)
        callee = self.expr(func, env)
        args = [self.expr(a.value if isinstance(a, ast.Starred) else a, env) for a in node.args]
        kwargs = {k.arg: self.expr(k.value, env) for k in node.keywords}
        if callee is None:
            return None
        if callee.kind == "pyfunc":
            return self.returns.get(callee.obj)
        if callee.kind == "usercls":
            return Value("instance", callee.obj) if callee.obj is not None else Value("userobj", callee.name)
        if callee.kind not in ("class", "method", "function"):
            return None
        label, sigs, drop_self = self.callable_signatures(callee)
        if any(isinstance(a, ast.Starred) for a in node.args) or None in kwargs:
            self.problem(
                node, f"{label}(...) is called with *args or **kwargs: spell the arguments out so they can be checked"
            )
            return Value("instance", callee.obj) if callee.kind == "class" else None
        if not sigs:
            self.problem(node, f"{label} has no signature in its docstring to check the call against")
            return Value("instance", callee.obj) if callee.kind == "class" else None
        for params, returns in sigs:
            if self.fits(params[1:] if drop_self else params, args, kwargs):
                return Value("instance", callee.obj) if callee.kind == "class" else self.instance_of(returns)
        called = [a.obj.__name__ if a is not None and a.kind == "instance" else "_" for a in args]
        called += [f"{key}=" for key in kwargs]
        offered = " or ".join(describe(params[1:] if drop_self else params) for params, _ in sigs)
        self.problem(node, f"{label}({', '.join(called)}) fits none of its signatures: {offered}")
        return None

    @staticmethod
    def literal_probe(node: ast.Call) -> bool:
        return (
            len(node.args) in (2, 3)
            and not node.keywords
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        )

    # ---- expressions

    def expr(self, node: ast.AST | None, env: dict) -> Value | None:
        if node is None:
            return None
        if isinstance(node, ast.Name):
            if node.id in env:
                return env[node.id]
            return Value("module", self.trt) if node.id in MODULE_NAMES else None
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self" and self.cls is not None:
                self.expr(node.value, env)
                return self.class_attrs.get(self.cls, {}).get(node.attr)
            base = self.expr(node.value, env)
            if base is None:
                return None
            if base.kind == "userobj":
                return self.class_attrs.get(base.name, {}).get(node.attr)
            if base.kind in ("module", "class", "instance"):
                return self.attribute(base, node.attr, node, store=isinstance(node.ctx, ast.Store))
            return None
        if isinstance(node, ast.Call):
            return self.call(node, env)
        if isinstance(node, (ast.BoolOp, ast.UnaryOp)) and (
            isinstance(node, ast.BoolOp) or isinstance(node.op, ast.Not)
        ):
            self.truth(node, env)
            return None
        if isinstance(node, ast.IfExp):
            known = self.truth(node.test, env)
            body = self.expr(node.body, env) if known is not False else None
            orelse = self.expr(node.orelse, env) if known is not True else None
            return body if known is True else orelse if known is False else (body or orelse)
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            inner = dict(env)
            for gen in node.generators:
                self.expr(gen.iter, inner)
                self.bind(gen.target, None, inner)
                for cond in gen.ifs:
                    self.expr(cond, inner)
            for part in ("elt", "key", "value"):
                self.expr(getattr(node, part, None), inner)
            return None
        if isinstance(node, ast.Lambda):
            inner = {k: v for k, v in env.items() if k not in {a.arg for a in node.args.args}}
            self.expr(node.body, inner)
            return None
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.expr(child, env)
            elif isinstance(child, ast.keyword):
                self.expr(child.value, env)
        return None

    def truth(self, node: ast.AST, env: dict) -> bool | None:
        """Whether a test is true on this release: known through capability probes and constants."""
        if isinstance(node, ast.Constant):
            return bool(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            known = self.truth(node.operand, env)
            return None if known is None else not known
        if isinstance(node, ast.BoolOp):
            stop = isinstance(node.op, ast.Or)  # the operand value that decides the whole test
            result = not stop
            for operand in node.values:
                known = self.truth(operand, env)
                if known is stop:
                    return stop  # the operands after it are not evaluated
                if known is None:
                    result = None
            return result
        value = self.expr(node, env)
        return value.obj if value is not None and value.kind == "probe" else None

    # ---- statements

    def bind(self, target: ast.AST, value: Value | None, env: dict) -> None:
        if isinstance(target, ast.Name):
            if value is not None:
                env[target.id] = value
        elif isinstance(target, ast.Attribute):
            if isinstance(target.value, ast.Name) and target.value.id == "self" and self.cls is not None:
                if value is not None:
                    self.class_attrs.setdefault(self.cls, {}).setdefault(target.attr, value)
            else:
                self.expr(target, env)  # a store: checks the property is settable
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                self.bind(element, None, env)
        elif isinstance(target, ast.Starred):
            self.bind(target.value, None, env)
        else:
            self.expr(target, env)

    def block(self, statements: list[ast.stmt], env: dict) -> bool:
        """Walk statements in order; True when the block always leaves (return/raise) on this release."""
        return any(self.statement(s, env) for s in statements)  # `any` stops at the first that leaves

    def statement(self, node: ast.stmt, env: dict) -> bool:
        if isinstance(node, ast.If):
            known = self.truth(node.test, env)
            body_leaves = self.block(node.body, env) if known is not False else True
            else_leaves = self.block(node.orelse, env) if known is not True else True
            return body_leaves and else_leaves
        if isinstance(node, ast.Return):
            value = self.expr(node.value, env)
            if self.scope is not None and value is not None:
                self.returns.setdefault(self.scope, value)
            return True
        if isinstance(node, ast.Raise):
            self.expr(node.exc, env)
            return True
        if isinstance(node, ast.Assign):
            if (
                len(node.targets) == 1
                and isinstance(node.targets[0], ast.Tuple)
                and isinstance(node.value, ast.Tuple)
                and len(node.targets[0].elts) == len(node.value.elts)
            ):
                for target, value in zip(node.targets[0].elts, node.value.elts, strict=True):
                    self.bind(target, self.expr(value, env), env)
                return False
            value = self.expr(node.value, env)
            for target in node.targets:
                self.bind(target, value, env)
            return False
        if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            value = self.expr(node.value, env)
            if isinstance(node, ast.AugAssign):
                self.expr(node.target, env)
            self.bind(node.target, value, env)
            return False
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            env[node.name] = Value("pyfunc", node)
            self.function(node, env)
            return False
        if isinstance(node, ast.ClassDef):
            env[node.name] = self.classdef(node, env)
            return False
        if isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                value = self.expr(item.context_expr, env)
                if item.optional_vars is not None:
                    self.bind(item.optional_vars, value, env)
            return self.block(node.body, env)
        if isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
            self.expr(node.iter if not isinstance(node, ast.While) else node.test, env)
            if not isinstance(node, ast.While):
                self.bind(node.target, None, env)
            self.block(node.body, env)
            self.block(node.orelse, env)
            return False
        if isinstance(node, ast.Try):
            self.block(node.body, env)
            for handler in node.handlers:
                self.expr(handler.type, env)
                self.block(handler.body, env)
            self.block(node.orelse, env)
            self.block(node.finalbody, env)
            return False
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "tensorrt":
                    env[alias.asname or "tensorrt"] = Value("module", self.trt)
            return False
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.expr(child, env)
        return False

    def function(self, node: ast.FunctionDef, env: dict) -> None:
        arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            self.expr(default, env)
        inner = {k: v for k, v in env.items() if k not in {a.arg for a in arguments}}
        outer, self.scope = self.scope, node
        self.block(node.body, inner)
        self.scope = outer

    def classdef(self, node: ast.ClassDef, env: dict) -> Value:
        bases = [self.expr(b, env) for b in node.bases]
        base = next((b.obj for b in bases if b is not None and b.kind == "class"), None)
        methods = [item for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))]
        outer = self.cls
        self.cls = None if base is not None else node.name  # a TensorRT subclass's own attributes are not checked
        if base is not None:
            for method in methods:
                if not method.name.startswith("__"):
                    self.override(base, method)
        for method in methods:
            self.function(method, env)
        for item in node.body:
            if not isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.statement(item, env)
        self.cls = outer
        return Value("usercls", base, node.name)

    def override(self, base: type, method: ast.FunctionDef) -> None:
        if not hasattr(base, method.name):
            self.problem(method, f"{method.name} overrides nothing: {base.__name__} has no {method.name}")
            return
        self.use(f"{base.__name__}.{method.name}")
        count = len(method.args.posonlyargs + method.args.args) - 1  # without self
        sigs = signatures(method.name, getattr(base, method.name).__doc__)
        if sigs and not any(
            len([p for p in params[1:] if p.kind in ("pos", "posonly")]) == count for params, _ in sigs
        ):
            offered = " or ".join(describe(params[1:]) for params, _ in sigs)
            self.problem(
                method,
                f"{method.name} takes {count} argument(s); {base.__name__}.{method.name} is called with {offered}",
            )

    def check(self, source: str) -> dict:
        """Two passes: the first learns what functions return and what `self.<attr>` holds, the second reports."""
        tree = ast.parse(source)
        for reporting in (False, True):
            self.reporting = reporting
            env: dict[str, Value] = {}
            for node in tree.body:  # the source's own functions and classes are known before any body runs
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    env[node.name] = Value("pyfunc", node)
                elif isinstance(node, ast.ClassDef):
                    env[node.name] = Value("usercls", None, node.name)
            self.block(tree.body, env)
        return {"problems": sorted(set(self.problems)), "checked": sorted(self.checked), "probes": self.probes}


def main() -> None:
    import tensorrt_bindings as trt

    request = json.load(sys.stdin)
    reports = {label: Checker(trt).check(source) for label, source in request["sources"].items()}
    json.dump(
        {"version": trt.__version__, "data_types": list(trt.DataType.__members__), "reports": reports}, sys.stdout
    )


if __name__ == "__main__":
    main()
