"""The command line: `graphopt run | passes | inspect | verify | bench | compare | sensitivity`. This module builds
the parser, runs `passes`, `inspect` and `verify`, and is the one entry point that maps errors to exit codes; `run`
lives in :mod:`graphopt.cli_run`, `bench` / `compare` in :mod:`graphopt.cli_backend`, `verify --backend` in
:mod:`graphopt.cli_lint`, `sensitivity` in :mod:`graphopt.cli_sensitivity`.

Bad input gets one ``graphopt: error: ...`` line on stderr and a non-zero exit (2 for usage, 1 otherwise);
``--debug`` shows the traceback. The input file is never written, and no output file is left behind on error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import warnings

from graphopt.cli_backend import (
    add_backend_commands,
    cmd_bench,
    cmd_compare,
    registry_from_args,
)
from graphopt.cli_lint import add_lint_flags, cmd_lint, wants_lint
from graphopt.cli_run import add_run_command, cmd_run, example_inputs
from graphopt.cli_sensitivity import add_sensitivity_command, cmd_sensitivity
from graphopt.errors import (
    INTERNAL_ERROR_EXIT,
    GraphoptError,
    ModelLoadError,
    UnsupportedError,
    UsageError,
    first_line,
)


class _Version(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())  # one line, not argparse's wrapped text
        parser.exit()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage dump
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _add_plugin_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-plugins", action="store_true",
                   help="do not autoload third-party plugins (also: GRAPHOPT_DISABLE_PLUGIN_AUTOLOAD=1)")
    p.add_argument("-p", dest="plugins", action="append", default=[], metavar="NAME",
                   help="load this plugin (entry-point or module name) even when autoloading is off")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-pickle", action="store_true",
                   help="load a pickled nn.Module (torch.save of a module): this runs the code the file carries, so "
                        "only for a file you trust; without it only weights and torch.export programs (.pt2) are read")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphopt", description="A compiler-style graph optimizer for neural networks.")
    parser.add_argument("--version", action=_Version, nargs=0, help="print graphopt's and its libraries' versions")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    add_run_command(sub, _add_plugin_flags, _add_trust_flag)

    passes = sub.add_parser("passes", help="list every pass and pipeline alias with its options")
    passes.add_argument("name", nargs="?", help="describe only this pass or alias")
    _add_plugin_flags(passes)

    inspect = sub.add_parser("inspect", help="summarize a model: inputs, outputs, op counts, parameters")
    inspect.add_argument("model")
    inspect.add_argument("--input-shape", action="append", default=[], metavar="1x3x224x224")
    _add_plugin_flags(inspect)
    _add_trust_flag(inspect)

    verify = sub.add_parser("verify", help="check a model: onnx checker with shape inference, and one run; with "
                                           "--backend, its Q/DQ placement against the backend's rules")
    verify.add_argument("model")
    verify.add_argument("--input-shape", action="append", default=[], metavar="1x3x224x224")
    add_lint_flags(verify)
    _add_plugin_flags(verify)
    _add_trust_flag(verify)

    add_backend_commands(sub, _add_plugin_flags)
    add_sensitivity_command(sub, _add_plugin_flags)
    return parser


def version_line() -> str:
    """``graphopt 0.1.0 (onnx 1.23.2, onnxruntime 1.32.0, ...)``: graphopt and the libraries it runs on, read
    from their package metadata (nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    import graphopt

    parts = []
    for dist in ("onnx", "onnxruntime", "onnx-graphsurgeon", "numpy", "torch"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
    return f"graphopt {graphopt.__version__} ({', '.join(parts)})"


def _load(args):
    from graphopt.ir import load_model

    return load_model(args.model, example_inputs(args.input_shape), trust_pickle=args.trust_pickle)


def cmd_passes(args) -> int:
    from graphopt.passes.options import describe_options

    registry = registry_from_args(args)
    names = sorted(registry.passes)
    aliases = sorted(registry.pipelines)
    if args.name:
        if args.name not in registry.passes and args.name not in registry.pipelines:
            registry.pass_class(args.name)  # raises the unknown-pass error with the known names
        names = [n for n in names if n == args.name]
        aliases = [a for a in aliases if a == args.name]
    for name in names:
        cls = registry.passes[name]
        doc = textwrap.dedent(cls.__doc__ or "").strip()
        print(f"{name}  [{', '.join(sorted(cls.irs))}; {cls.equivalence.value}; plugin {registry.origin.get(name)}]")
        for line in doc.splitlines():
            print(f"    {line}".rstrip())
        for opt, type_name, default in describe_options(cls.Options):
            print(f"    option {opt}: {type_name} = {default}")
        print()
    for name in aliases:
        alias = registry.pipelines[name]
        print(f"{name}  = {alias.text}  [alias; plugin {alias.plugin}]")
        if alias.doc:
            print(f"    {alias.doc}")
        print()
    for name in sorted(registry.instruments) if not args.name else []:
        doc = (textwrap.dedent(getattr(registry.instruments[name], "__doc__", None) or "").strip().splitlines()
               or [""])[0]
        print(f"{name}  [instrument, --instrument {name}; plugin {registry.origin.get(('instrument', name))}]"
              + (f"\n    {doc}" if doc else "") + "\n")
    for plugin, reason in sorted(registry.failed.items()):
        print(f"plugin '{plugin}' failed to load: {reason}", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    graph = _load(args)
    info = graph.describe()
    print(f"{args.model}: {info['ir']}, {info['nodes']} nodes, {info['parameters']:,} parameters")
    if graph.ir == "onnx":
        print(f"opset {graph.opset}")
        for kind, tensors in (("input", graph.gs.inputs), ("output", graph.gs.outputs)):
            for t in tensors:
                print(f"{kind} {t.name}: {t.dtype.__name__ if hasattr(t.dtype, '__name__') else t.dtype} {t.shape}")
    for op, count in graph.op_counts().most_common():
        print(f"  {count:5d}  {op}")
    return 0


def cmd_verify(args) -> int:
    if wants_lint(args):
        return cmd_lint(args)
    graph = _load(args)
    try:
        graph.verify()
    except ValueError as exc:
        raise ModelLoadError(f"{args.model}: invalid: {first_line(exc)} (fix or re-export the model)") from None
    try:
        outputs = graph.run(graph.sample_inputs())
    except UnsupportedError as exc:  # valid, but onnxruntime has no kernel for an op (a custom domain)
        raise UnsupportedError(f"{args.model}: valid, but not run: {exc}") from None
    except Exception as exc:  # valid, but onnxruntime refuses these inputs (shape or index inputs, say)
        raise UnsupportedError(f"{args.model}: valid, but onnxruntime could not run it on generated inputs: "
                               f"{first_line(exc)} (run it on real inputs: graphopt compare MODEL MODEL --data "
                               f"DATA.npz)") from None
    shapes = ", ".join(str(tuple(o.shape)) for o in outputs)
    print(f"{args.model}: valid; ran on sample inputs, outputs {shapes}")
    return 0


_NULL_HANDLER = logging.NullHandler()
COMMANDS = {"run": cmd_run, "passes": cmd_passes, "inspect": cmd_inspect, "verify": cmd_verify,
            "bench": cmd_bench, "compare": cmd_compare, "sensitivity": cmd_sensitivity}


def printable(text: str) -> str:
    """One line a terminal shows as it is: control characters from names and paths inside a model (a newline that
    would forge a second error line, ANSI escapes, NUL) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    # warnings are printed once, on stdout with the report (`warning: ...`): without a handler of its own, the
    # "graphopt" logger would also print each one on stderr (logging's last resort), where only errors belong
    logging.getLogger("graphopt").addHandler(_NULL_HANDLER)
    try:
        with warnings.catch_warnings():
            if not debug:  # libraries' Python warnings (numpy on odd weights, torch deprecations) are not the
                warnings.simplefilter("ignore")  # user's to act on; graphopt's own are in the report
            args = build_parser().parse_args(argv)
            return COMMANDS[args.command](args)
    except GraphoptError as exc:
        if debug:
            raise
        print(f"graphopt: error: {printable(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `graphopt passes | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in graphopt or a plugin: still one line unless --debug
        if debug:
            raise
        print(f"graphopt: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              f"(rerun with --debug for the traceback)", file=sys.stderr)
        return INTERNAL_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
