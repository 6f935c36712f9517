"""`graphopt run | passes | inspect | verify | bench | compare` — the command line.

Bad input gets one ``graphopt: error: ...`` line on stderr and a non-zero exit (2 for usage, 1 otherwise);
``--debug`` shows the traceback. The input file is never written, and no output file is left behind on error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import textwrap

from graphopt.backends import get_backend
from graphopt.cli_backend import add_backend_commands, cmd_bench, cmd_compare, load_npz, registry_from_args
from graphopt.errors import (
    INTERNAL_ERROR_EXIT,
    EquivalenceError,
    GraphoptError,
    ModelLoadError,
    UsageError,
    VerificationError,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage dump
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _add_plugin_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-plugins", action="store_true",
                   help="do not autoload third-party plugins (also: GRAPHOPT_DISABLE_PLUGIN_AUTOLOAD=1)")
    p.add_argument("-p", dest="plugins", action="append", default=[], metavar="NAME",
                   help="load this plugin (entry-point or module name) even when autoloading is off")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphopt", description="A compiler-style graph optimizer for neural networks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser("run", help="run a pipeline of passes on a model")
    run.add_argument("model", help="an .onnx file, or a .pt file saved by graphopt / torch.save(module)")
    run.add_argument("--passes", "-P", default="fold",
                     help="textual pipeline, e.g. fold or fold,prune:ratio=0.5 (default: fold)")
    run.add_argument("-o", "--output", help="output path (default: beside the input, with .opt before the suffix)")
    run.add_argument("--verify-each", action="store_true", help="onnx checker / FX lint after every pass")
    run.add_argument("--no-check", action="store_true",
                     help="skip the numeric check (outputs before vs after each pass on fixed-seed inputs)")
    run.add_argument("--rtol", type=float, default=1e-4,
                     help="max relative output error allowed for exact passes (default 1e-4)")
    run.add_argument("--bisect", action="store_true",
                     help="find the first pass whose output no longer matches the original; writes no model")
    run.add_argument("--snapshot-dir", metavar="DIR", help="save the model after each pass into DIR")
    run.add_argument("--reproducer", metavar="DIR", help="if a pass fails, save its input model and command to DIR")
    run.add_argument("--json", metavar="PATH", help="also write the run report as JSON")
    run.add_argument("--calib", metavar="DATA",
                     help="calibration data for int8: .npz (one array per input), .npy, a folder of .npy/.npz or "
                          "of images (default: synthetic random inputs, with a loud warning)")
    run.add_argument("--calib-resize", type=int, metavar="N", help="images: resize the shorter side to N pixels")
    run.add_argument("--calib-crop", type=int, metavar="N", help="images: center crop N x N")
    run.add_argument("--calib-mean", metavar="0.485,0.456,0.406", help="images: per-channel mean (after /255)")
    run.add_argument("--calib-std", metavar="0.229,0.224,0.225", help="images: per-channel std (after /255)")
    run.add_argument("--backend", default="onnxruntime",
                     help="the backend to report latency/accuracy on (default: onnxruntime)")
    run.add_argument("--eval", metavar="DATA.npz",
                     help="labelled data (inputs + --labels array): report accuracy, output SQNR and per-layer "
                          "SQNR of the written model against the input")
    run.add_argument("--labels", default="labels", metavar="KEY", help="the labels array in --eval (default: labels)")
    run.add_argument("--bench", action="store_true", help="report latency before and after on the backend")
    run.add_argument("--input-shape", action="append", default=[], metavar="1x3x224x224",
                     help="example input shape for a plain PyTorch module (repeat for several inputs)")
    run.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    _add_plugin_flags(run)

    passes = sub.add_parser("passes", help="list every pass and pipeline alias with its options")
    passes.add_argument("name", nargs="?", help="describe only this pass or alias")
    _add_plugin_flags(passes)

    inspect = sub.add_parser("inspect", help="summarize a model: inputs, outputs, op counts, parameters")
    inspect.add_argument("model")
    inspect.add_argument("--input-shape", action="append", default=[], metavar="1x3x224x224")
    _add_plugin_flags(inspect)

    verify = sub.add_parser("verify", help="check a model: onnx checker with shape inference, and one run")
    verify.add_argument("model")
    verify.add_argument("--input-shape", action="append", default=[], metavar="1x3x224x224")
    _add_plugin_flags(verify)

    for p in (run, inspect, verify):
        p.add_argument("--trust-pickle", action="store_true",
                       help="load a pickled nn.Module (torch.save of a module): this runs the code the file carries, "
                            "so only for a file you trust")
    add_backend_commands(sub, _add_plugin_flags)
    return parser


def _example_inputs(shapes: list[str]):
    if not shapes:
        return None
    import torch

    out = []
    for text in shapes:
        try:
            out.append(torch.randn(*[int(d) for d in text.lower().split("x")]))
        except ValueError:
            raise UsageError(f"--input-shape '{text}' is not like 1x3x224x224") from None
    return tuple(out)


def _load(args):
    from graphopt.ir import load_model

    return load_model(args.model, _example_inputs(args.input_shape), trust_pickle=args.trust_pickle)


def default_output(path: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.opt{ext or '.onnx'}"


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _save_atomically(graph, path: str) -> None:
    """Write into a temporary folder beside ``path``, then move the files into place (model + external data)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"output folder {folder} does not exist")
    tmp = tempfile.mkdtemp(prefix=".graphopt-", dir=folder)
    try:
        graph.save(os.path.join(tmp, os.path.basename(path)))
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cmd_run(args) -> int:
    from graphopt.passes.base import PassContext
    from graphopt.passes.instruments import CrashReproducer, NumericCheck, Snapshot, Verify
    from graphopt.passes.manager import PassManager, bisect
    from graphopt.passes.pipeline import format_passes, parse_pipeline, resolve
    from graphopt.report.run_report import cost_report, format_run, jsonable_run, measure_costs, measure_run

    pipeline = parse_pipeline(args.passes)  # syntax errors before any loading
    registry = registry_from_args(args)
    output = args.output or default_output(args.model)
    if _same_file(output, args.model):
        raise UsageError(f"output {output} is the input model; graphopt never overwrites its input")
    passes = resolve(pipeline, registry)
    backend = get_backend(registry, args.backend)
    eval_data, labels = _eval_data(args)
    graph = _load(args)
    ctx = PassContext(registry=registry, calibration=_calibration(args, graph), backend=backend)
    say = (lambda *a: None) if args.quiet else print

    if args.bisect:
        result = bisect(graph, passes, ctx, rtol=args.rtol)
        say(result.describe(args.rtol))
        return EquivalenceError.exit_code if result.culprit else 0

    instruments = []
    if args.verify_each:
        instruments.append(Verify())
    if not args.no_check:
        instruments.append(NumericCheck(rtol=args.rtol))
    if args.snapshot_dir:
        instruments.append(Snapshot(args.snapshot_dir))
    if args.reproducer:
        instruments.append(CrashReproducer(args.reproducer))
    before = graph.describe()
    costs_before = measure_costs(graph)  # parameters and MACs, before the passes edit the graph in place
    out, report = PassManager(passes, instruments, ctx).run(graph, in_place=True)  # the graph is only ours
    if report.modified:
        try:
            out.verify()
        except ValueError as exc:
            raise VerificationError(report.records[-1].name,
                                    f"the optimized model is invalid ({exc}); nothing written") from None
    _save_atomically(out, output)

    after = out.describe()
    say(f"{args.model}: {graph.ir}, {before['nodes']} nodes, {before['parameters']:,} parameters")
    say(f"pipeline: {pipeline}" + (f"  (= {format_passes(passes)})" if str(pipeline) != format_passes(passes) else ""))
    say(report.table())
    for warning in report.warnings:
        say(f"warning: {warning}")
    say(f"wrote {output}: {after['nodes']} nodes, {after['parameters']:,} parameters")
    measured = {}
    costs = (costs_before, measure_costs(out))
    if graph.ir == "onnx":
        measured = measure_run(args.model, output, backend, data=eval_data, labels=labels, labels_key=args.labels,
                               bench=args.bench, costs=costs)
        say(format_run(measured))
    else:  # a PyTorch model: parameters and MACs only
        measured = cost_report(*costs)
        say(format_run(measured))
    if args.json:
        data = {"input": {"path": args.model, **before}, "output": {"path": output, **after},
                "pipeline": str(pipeline), "resolved": format_passes(passes), **report.to_dict(),
                **jsonable_run(measured)}
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2, default=str)
    return 0


def _calibration(args, graph):
    """``--calib`` opened and checked against the model's inputs before any pass runs (image options applied)."""
    image_flags = (args.calib_resize, args.calib_crop, args.calib_mean, args.calib_std)
    if not args.calib:
        if any(f is not None for f in image_flags):
            raise UsageError("--calib-resize/--calib-crop/--calib-mean/--calib-std need --calib FOLDER of images")
        return None
    if graph.ir != "onnx":
        return args.calib
    from graphopt.calib.sources import ImageOptions, input_specs, load_calibration

    options = None
    if any(f is not None for f in image_flags):
        options = ImageOptions(resize=args.calib_resize, crop=args.calib_crop,
                               mean=_floats(args.calib_mean, "--calib-mean"),
                               std=_floats(args.calib_std, "--calib-std"))
    return load_calibration(args.calib, input_specs(graph), image_options=options)


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} '{text}' is not a comma-separated list of numbers") from None


def _eval_data(args):
    """``--eval``'s inputs and labels, read before any pass runs so a bad file fails early."""
    if not args.eval:
        return None, None
    data = load_npz(args.eval)
    if args.labels not in data:
        raise UsageError(f"{args.eval} has no labels array '{args.labels}' (it has: {', '.join(sorted(data))}); "
                         f"name it with --labels")
    labels = data.pop(args.labels)
    return data, labels


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
    graph = _load(args)
    try:
        graph.verify()
    except ValueError as exc:
        raise ModelLoadError(f"{args.model}: invalid: {exc}") from None
    outputs = graph.run(graph.sample_inputs())
    shapes = ", ".join(str(tuple(o.shape)) for o in outputs)
    print(f"{args.model}: valid; ran on sample inputs, outputs {shapes}")
    return 0


COMMANDS = {"run": cmd_run, "passes": cmd_passes, "inspect": cmd_inspect, "verify": cmd_verify,
            "bench": cmd_bench, "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except GraphoptError as exc:
        if debug:
            raise
        print(f"graphopt: error: {exc}", file=sys.stderr)
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
