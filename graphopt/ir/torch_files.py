"""What a PyTorch file holds, told from its bytes, and how to open it without running code it carries.

A file is one of: a torch.export archive (``torch.export.save``, a zip with ``archive_format`` = ``pt2``), an
AOTInductor package (the same archive with compiled code under ``data/aotinductor/``), a TorchScript archive, a
``torch.save`` zip (``data.pkl``), or a pickle (``torch.save`` before the zip format, or ``pickle.dump``). The
suffix is not looked at: a ``.pt2`` that holds a ``torch.save`` zip is read as one, and the other way round.

Without ``trust_pickle`` nothing the file names is imported or run:

- ``torch.save`` files and pickles go through ``torch.load(weights_only=True)`` (torch's restricted unpickler:
  tensors, containers, the safe globals). A pickled nn.Module needs ``trust_pickle``.
- torch.export archives are checked before ``torch.export.load``, which (torch 2.13) still runs code a crafted
  archive carries in four places: it unpickles sample inputs and tensor-subclass payloads with
  ``weights_only=False`` (or with a ``weights_only=True`` that falls back to ``False`` on failure), unpickles
  opaque/custom constants with ``pickle``, evaluates symbolic-shape expressions with ``sympy.sympify`` (``eval``),
  and imports modules named in pytree contexts (``__enum__``, defaultdict factories). So: such constants and
  contexts are refused, every expression must be a plain sympy formula (:func:`_check_sym_expr`), and the load
  runs with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` so every ``torch.load`` inside it is restricted.
- AOTInductor packages are refused always: loading one loads its shared library.
"""

from __future__ import annotations

import _compat_pickle  # pickle's own names for Python 2 modules (__builtin__ -> builtins)
import ast
import contextlib
import functools
import json
import os
import pickle
import pickletools
import re
import warnings
import zipfile

from graphopt.errors import GraphoptError, ModelLoadError, UnsupportedError, first_line
from graphopt.quiet import quiet_torch_logs

TRUST_HINT = "pass --trust-pickle (trust_pickle=True) only for a file you trust"
EXPORT_HINT = "save the whole program with torch.export.save as .pt2"
PROGRAM_HINT = f"give the nn.Module to the Python API, graphopt.optimize(module, ...), or {EXPORT_HINT}"

_ZIP_MAGIC = b"PK\x03\x04"


def looks_like_torch_file(path: str) -> bool:
    """True when the file starts like a zip archive or a pickle (no ONNX model does)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return _container(head) is not None


def _container(head: bytes) -> str | None:
    """What a file's first bytes announce: a zip archive, a pickle (protocols 2 to 5: torch.save, pickle.dump)."""
    if head[:4] == _ZIP_MAGIC:
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return None


def read_torch_file(path: str, *, trust_pickle: bool = False):
    """The program in ``path``: a ``torch.export.ExportedProgram``, an ``nn.Module``, or ``(module, example
    inputs)`` from a file graphopt wrote before it saved torch.export programs. Anything else is a one-line
    :class:`ModelLoadError` (an AOTInductor or TorchScript archive: :class:`UnsupportedError`)."""
    kind = _kind(path)
    if kind == "aoti":
        raise UnsupportedError(f"{path}: an AOTInductor package is compiled code, not a graph graphopt can optimize "
                               f"(give the .pt2 of torch.export.save)")
    if kind == "torchscript":
        raise UnsupportedError(f"{path}: a TorchScript archive (torch.jit.save), not a graph graphopt can optimize "
                               f"({EXPORT_HINT}, or export it to .onnx)")
    try:
        if kind == "export":
            return _load_export(path, trust_pickle)
        return _load_pickled(path, trust_pickle)
    except GraphoptError:
        raise
    except Exception as exc:  # torch's readers on a damaged file: one line, never a traceback
        raise ModelLoadError(f"{path}: not a readable PyTorch file: {first_line(exc)} ({EXPORT_HINT} again)") from None


# -- what the bytes are ------------------------------------------------------------------------------------------
def torch_file_kind(path: str) -> str:
    """``"export"`` (a torch.export program), ``"aoti"`` (an AOTInductor package), ``"torchscript"``,
    ``"torch.save"`` or ``"pickle"``, told from the bytes; a file that is none of them (an ONNX model) is a
    :class:`ModelLoadError`."""
    return _kind(path)


def _kind(path: str) -> str:
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: is a directory, not a model file")
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot be read ({exc.strerror})") from None
    if not head:
        raise ModelLoadError(f"{path}: is empty, not a PyTorch file ({EXPORT_HINT} again)")
    container = _container(head)
    if container == "zip":
        return _zip_kind(path)
    if container == "pickle":
        return "pickle"
    raise ModelLoadError(f"{path}: not a PyTorch file (neither a torch.export / torch.save zip nor a pickle)")


def _zip_kind(path: str) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            root = names[0].split("/")[0] if names else ""
            format_file = f"{root}/archive_format"
            pt2 = format_file in names and zf.read(format_file).strip() == b"pt2"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path}: a truncated or damaged zip archive ({first_line(exc)}) "
                             f"(write it again)") from None
    if any(n.startswith(f"{root}/data/aotinductor/") for n in names):
        return "aoti"
    if pt2:
        return "export"
    if f"{root}/constants.pkl" in names:
        return "torchscript"
    if f"{root}/data.pkl" in names:
        return "torch.save"
    raise ModelLoadError(f"{path}: a zip archive that is neither a torch.export program (.pt2) nor a torch.save file "
                         f"({EXPORT_HINT})")


# -- torch.save files and pickles ----------------------------------------------------------------------------------
def _load_pickled(path: str, trust_pickle: bool):
    import torch

    if trust_pickle:  # the user's choice: the pickle runs whatever it carries
        try:
            obj = torch.load(path, weights_only=False, map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(f"{path}: could not unpickle it ({first_line(exc)}) (import the module that "
                                 f"defines its classes first, or {EXPORT_HINT})") from None
        if isinstance(obj, dict) and "graphopt_fx" in obj:  # written by graphopt before it saved .pt2 programs
            return obj["module"], obj.get("example_inputs")
    else:
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols it reads anyway
                warnings.simplefilter("ignore")
                obj = torch.load(path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as exc:
            raise ModelLoadError(_refused_pickle_message(path, str(exc))) from None
    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, dict):
        raise ModelLoadError(f"{path}: holds only weights (a state dict), no program to optimize ({PROGRAM_HINT})")
    what = "a tensor" if isinstance(obj, torch.Tensor) else f"a Python {type(obj).__name__}"
    raise ModelLoadError(f"{path}: holds {what}, not a program to optimize ({PROGRAM_HINT})")


def _refused_pickle_message(path: str, error: str) -> str:
    """Why torch's restricted unpickler refused ``path``: the classes and functions it names (a pickled nn.Module
    or other code), or a pickle it cannot read."""
    names = _pickle_globals(path)
    refused = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", error)
    foreign = [n for n in names if not n.startswith(("torch.", "collections."))]
    if refused and not foreign:
        foreign.append(refused.group(1))
    if any(n.startswith(("torch.nn.modules.", "torch.fx.graph_module.")) for n in names):
        top = next((n for n in names if not n.startswith(("collections.", "torch._utils."))), names[0])
        return (f"{path}: holds a pickled nn.Module ({top}): loading it runs the code it carries "
                f"({TRUST_HINT}, or {EXPORT_HINT})")
    if foreign:
        return (f"{path}: holds pickled Python objects ({', '.join(foreign[:3])}), not only weights: loading it "
                f"runs the code it carries ({TRUST_HINT})")
    detail = error.split("WeightsUnpickler error:")[-1].strip() or error
    return f"{path}: not a readable PyTorch file (torch's weights-only unpickler: {first_line(Exception(detail))})"


def _pickle_globals(path: str) -> list[str]:
    """The classes and functions the pickles in ``path`` name, in order, read with pickletools: nothing is
    imported or run. A torch.save zip's pickle is ``data.pkl``; an old torch.save file is several pickles in a
    row followed by raw tensor bytes."""
    names: list[str] = []
    strings: list[str] = []
    with contextlib.ExitStack() as stack:
        if zipfile.is_zipfile(path):
            zf = stack.enter_context(zipfile.ZipFile(path))
            stream = stack.enter_context(zf.open(next(n for n in zf.namelist() if n.endswith("/data.pkl"))))
        else:
            stream = stack.enter_context(open(path, "rb"))
        for _ in range(8):
            try:
                for op, arg, _pos in pickletools.genops(stream):
                    if op.name in ("GLOBAL", "INST"):
                        module, _, name = str(arg).partition(" ")
                        names.append(f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}")
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(".".join(strings[-2:]))
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:  # the raw tensor bytes after the pickles, or a damaged pickle
                break
    return list(dict.fromkeys(names))


# -- torch.export archives ------------------------------------------------------------------------------------------
def _load_export(path: str, trust_pickle: bool):
    import torch

    with quiet_torch_logs(), contextlib.suppress(ImportError):  # the Q/DQ ops an int8 program calls (graphopt's
        import torch.ao.quantization.fx._decomposed  # noqa: F401  own int8 results): registered before it loads
    if not trust_pickle:
        _check_export_archive(path)
    with open(path, "rb") as f, quiet_torch_logs(), (contextlib.nullcontext() if trust_pickle
                                                      else _weights_only_everywhere()):
        try:
            return torch.export.load(f)
        except pickle.UnpicklingError:
            raise ModelLoadError(f"{path}: the program carries pickled Python objects, not only tensors: "
                                 f"loading them runs the code they carry ({TRUST_HINT})") from None


def _check_export_archive(path: str) -> None:
    """Refuse, before torch.export.load sees it, what in a torch.export archive would import or run code."""
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        root = names[0].split("/")[0]
        models = [n for n in names if n.startswith(f"{root}/models/") and n.endswith(".json")]
        if not models:
            raise ModelLoadError(f"{path}: a .pt2 archive with no exported program in it "
                                 f"(give the .pt2 of torch.export.save)")
        for name in names:
            if re.search(r"/(custom_obj_|opaque_obj_)[^/]*$", name):
                raise ModelLoadError(f"{path}: the program carries pickled Python objects ({name.split('/')[-1]}): "
                                     f"loading them runs the code they carry ({TRUST_HINT})")
        for name in models:
            text = zf.read(name).decode("utf-8", errors="replace")
            if "__enum__" in text or "default_factory_module" in text:
                raise ModelLoadError(f"{path}: the program's input/output structure names Python modules to import "
                                     f"({TRUST_HINT})")
            try:
                document = json.loads(text)
            except ValueError as exc:
                raise ModelLoadError(f"{path}: {name} is not valid JSON ({first_line(exc)})") from None
            for expr in _values_of(document, "expr_str"):
                if not _check_sym_expr(expr):
                    raise ModelLoadError(f"{path}: a symbolic shape in the program is not a plain formula "
                                         f"({expr[:60]!r}); torch evaluates it as Python code ({TRUST_HINT})")


def _values_of(document, key: str):
    if isinstance(document, dict):
        for k, v in document.items():
            if k == key and isinstance(v, str):
                yield v
            else:
                yield from _values_of(v, key)
    elif isinstance(document, list):
        for v in document:
            yield from _values_of(v, key)


_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?(/\d+)?|[-+]?(inf|nan)", re.ASCII)
_SYMBOL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*", re.ASCII)
_STRING_ARGS = {"Symbol": _SYMBOL_NAME, "Float": _NUMBER, "Integer": _NUMBER, "Rational": _NUMBER}
_SAFE_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Load, ast.operator, ast.unaryop,
               ast.boolop, ast.cmpop)


@functools.lru_cache(maxsize=1)
def _sympy_function_names() -> frozenset[str]:
    import sympy
    import torch.utils._sympy.functions as torch_functions

    names = {n for n, obj in vars(torch_functions).items() if isinstance(obj, type) and issubclass(obj, sympy.Basic)}
    return frozenset(names | {
        "Add", "Mul", "Pow", "Integer", "Float", "Rational", "Symbol", "Max", "Min", "Abs", "floor", "ceiling",
        "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan", "StrictGreaterThan",
        "LessThan", "GreaterThan", "And", "Or", "Not", "Piecewise", "ExprCondPair", "IntInfinity",
        "NegativeIntInfinity", "Infinity", "NegativeInfinity", "NaN", "Zero", "One", "NegativeOne", "Half",
    })


def _check_sym_expr(text: str) -> bool:
    """True when ``text`` (a sympy ``srepr`` that torch gives to ``sympy.sympify``, which ``eval``s it) only calls
    sympy and torch shape functions on numbers and symbols: no attribute, subscript, lambda, or other names
    called, and strings only as a Symbol's name or a number's digits."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    functions = _sympy_function_names()
    strings_allowed: set[int] = set()  # a Call is walked before its arguments
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in functions):
                return False
            pattern = _STRING_ARGS.get(node.func.id)
            first = node.args[0] if node.args else None
            if pattern and isinstance(first, ast.Constant) and isinstance(first.value, str):
                if not pattern.fullmatch(first.value):
                    return False
                strings_allowed.add(id(first))
            if any(not (isinstance(k.arg, str) and isinstance(k.value, ast.Constant)
                        and type(k.value.value) in (bool, int)) for k in node.keywords):
                return False
        elif isinstance(node, ast.Constant):
            if type(node.value) not in (bool, int, float) and id(node) not in strings_allowed:
                return False
        elif isinstance(node, ast.Name):
            if node.id.startswith("_"):
                return False
        elif not isinstance(node, (ast.keyword, *_SAFE_NODES)):
            return False
    return True


@contextlib.contextmanager
def _weights_only_everywhere():
    """Every ``torch.load`` in the block uses torch's restricted unpickler, even one that asks for
    ``weights_only=False`` (torch reads ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` on each call)."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


__all__ = ["looks_like_torch_file", "read_torch_file"]
