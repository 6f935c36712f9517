"""`graphopt run`: its flags, and the run itself — plan every file it reads and writes, run the pipeline through the
driver, check, write (staged), report.

The same one-line error rules as :mod:`graphopt.cli` apply (it maps graphopt's errors to exit codes).
"""

from __future__ import annotations

import json
import os
import shutil

from graphopt.cli_backend import add_backend_option_flags, backend_from_args, load_npz, registry_from_args
from graphopt.errors import EquivalenceError, UsageError


def add_run_command(sub, add_plugin_flags, add_trust_flag) -> None:
    run = sub.add_parser("run", help="run a pipeline of passes on a model")
    run.add_argument("model", help="an .onnx file or a torch.export .pt2 (a torch.save'd module needs --trust-pickle)")
    run.add_argument("--passes", "-P", default=None,
                     help="textual pipeline, e.g. fold or fold,prune:ratio=0.5 (default: fold)")
    run.add_argument("--recipe", metavar="FILE.yaml",
                     help="replay a decision graphopt sensitivity --recipe wrote (its passes and backend, or with "
                          "--backend that backend's form); refused on another model")
    run.add_argument("-o", "--output", help="output path (default: beside the input, with .opt before the suffix)")
    run.add_argument("--executor", metavar="SPEC", default=None,
                     help="where searches run their trials (prune:budget=...): inprocess, processes[:N], ray, "
                          "ray://host:port (default in-process; a pass's own executor= option wins)")
    run.add_argument("--verify-each", action="store_true",
                     help="onnx checker / FX lint and the numeric comparison after every modifying pass")
    run.add_argument("--no-check", action="store_true",
                     help="skip the numeric check (the outputs of the original against the result's, on --eval or "
                          "--calib samples or generated inputs)")
    run.add_argument("--rtol", type=float, default=1e-4,
                     help="max relative output error allowed for exact passes (default 1e-4)")
    run.add_argument("--bisect", action="store_true",
                     help="find the first pass whose output no longer matches the original; writes no model")
    run.add_argument("--snapshot-dir", metavar="DIR", help="save the model after each pass into DIR")
    run.add_argument("--reproducer", metavar="DIR", help="if a pass fails, save its input model and command to DIR")
    run.add_argument("--json", metavar="PATH", help="also write the run report as JSON")
    run.add_argument("--report", metavar="DIR",
                     help="also write report.json, report.md and PNG plots (before/after bars; per-layer SQNR with "
                          "--eval) into DIR (created if missing)")
    run.add_argument("--calib", metavar="DATA",
                     help="calibration data for int8: .npz (one array per input), .npy, a folder of .npy/.npz or "
                          "of images (default: synthetic random inputs, with a loud warning)")
    run.add_argument("--calib-resize", type=int, metavar="N", help="images: resize the shorter side to N pixels")
    run.add_argument("--calib-crop", type=int, metavar="N", help="images: center crop N x N")
    run.add_argument("--calib-mean", metavar="0.485,0.456,0.406", help="images: per-channel mean (after /255)")
    run.add_argument("--calib-std", metavar="0.229,0.224,0.225", help="images: per-channel std (after /255)")
    run.add_argument("--backend",
                     help="the target backend: its quantization scheme is what int8 places, and latency/accuracy "
                          "are measured on it (default: onnxruntime); options as name:key=value:key2=value2")
    add_backend_option_flags(run, run=True)
    run.add_argument("--eval", metavar="DATA.npz",
                     help="labelled data (inputs + --labels array): report accuracy, output SQNR and per-layer "
                          "SQNR of the written model against the input")
    run.add_argument("--labels", default="labels", metavar="KEY", help="the labels array in --eval (default: labels)")
    run.add_argument("--bench", action="store_true", help="report latency before and after on the backend")
    run.add_argument("--input-shape", action="append", default=[], metavar="1x3x224x224",
                     help="example input shape for a plain PyTorch module (repeat for several inputs)")
    run.add_argument("--instrument", action="append", default=[], metavar="NAME",
                     help="also run this instrument around every pass (one a plugin registered; repeatable)")
    run.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    add_plugin_flags(run)
    add_trust_flag(run)


def example_inputs(shapes: list[str]):
    """``--input-shape`` values as random tensors (None without any)."""
    if not shapes:
        return None
    import torch

    out = []
    for text in shapes:
        try:
            dims = [int(d) for d in text.lower().split("x")]
        except ValueError:
            raise UsageError(f"--input-shape '{text}' is not like 1x3x224x224") from None
        if any(d < 1 for d in dims):
            raise UsageError(f"--input-shape '{text}': every dimension must be at least 1")
        out.append(torch.randn(*dims))
    return tuple(out)


def default_output(path: str, ir: str = "onnx") -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.opt.onnx" if ir == "onnx" else f"{root}.opt.pt2"


CLI_FLAGS = {"output": "-o", "snapshot_dir": "--snapshot-dir", "reproducer": "--reproducer"}


def _io_plan(args, driver, graph, output: str):
    """Every file the run reads and writes (the driver's, and the command line's own), checked against each other
    before any pass runs."""
    from graphopt.ir import refuse_suffix

    refuse_suffix(graph, output, CLI_FLAGS["output"])
    plan = driver.io_plan(args.model, graph, output, CLI_FLAGS)
    plan.read("evaluation data", args.eval)
    plan.read("--recipe", args.recipe)
    plan.write("--json", args.json)
    if args.report:
        from graphopt.report.plots import need_matplotlib
        from graphopt.report.report_dir import FILES

        need_matplotlib("--report")
        plan.write_into("--report", args.report, list(FILES))
    plan.check()


def cmd_run(args) -> int:
    from graphopt.backends.base import DataError, model_size_bytes
    from graphopt.driver import Driver, RunConfig
    from graphopt.ir import load_model
    from graphopt.passes.instruments import FloatReference
    from graphopt.passes.manager import bisect
    from graphopt.paths import atomic_write, real
    from graphopt.report.layers import json_text
    from graphopt.report.run_report import (
        cost_report,
        format_run,
        jsonable_run,
        measure_costs,
        measure_run,
        per_layer_fx,
    )

    for flag, value in (("--passes", args.passes), ("-o", args.output)):
        if value is not None and not value.strip():  # an unset variable in a build script: not a default
            raise UsageError(f"{flag} is empty (leave it out for its default)")
    if args.recipe:
        from graphopt.recipe import apply_recipe

        apply_recipe(args)  # its passes, and the backend's form (--backend: another backend's)
    args.passes = args.passes or "fold"
    args.backend = args.backend or "onnxruntime"
    registry = registry_from_args(args)
    eval_data, labels = _eval_data(args)
    reference = FloatReference()  # a PyTorch run's per-layer table compares the quantized graph with this one
    backend = backend_from_args(args, registry)  # with the options its flags set
    config = RunConfig(passes=args.passes, backend=backend, example_inputs=example_inputs(args.input_shape),
                       calibration=args.calib, image_options=_image_options(args), eval_inputs=eval_data,
                       check=not args.no_check, rtol=args.rtol, verify_each=args.verify_each,
                       snapshot_dir=args.snapshot_dir, reproducer=args.reproducer,
                       instruments=tuple(args.instrument) + ((reference,) if eval_data is not None else ()),
                       trust_pickle=args.trust_pickle, executor=args.executor)
    driver = Driver(config, registry)  # pipeline, passes, backend, instruments: usage errors before loading
    graph = driver.load(args.model)  # reading writes nothing; what it reads is known once it is loaded
    output = args.output or default_output(args.model, graph.ir)
    _io_plan(args, driver, graph, output)
    say = (lambda *a: None) if args.quiet else print

    if args.bisect:
        result = bisect(graph, driver.passes, driver.context(graph), rtol=args.rtol)
        say(result.describe(args.rtol))
        return EquivalenceError.exit_code if result.culprit else 0

    costs_before = measure_costs(graph)  # parameters and MACs, before the passes edit the graph in place
    measured: dict = {}
    unmeasured: list[str] = []  # what was asked but cannot be measured here
    # a PyTorch model on a backend that runs it (x86): before = the input lowered the same way, after = the file
    runs_fx = graph.ir == "fx" and "fx" in driver.backend.irs and not output.lower().endswith(".onnx")
    original = graph.copy() if runs_fx and (args.bench or eval_data is not None) else None

    def measure(staged_path: str, result) -> None:  # on the written file before it moves: a failure leaves nothing
        costs = (costs_before, measure_costs(result))
        if original is not None:
            measured.update(measure_run(original, staged_path, driver.backend, data=eval_data, labels=labels,
                                        labels_key=args.labels, bench=args.bench, costs=costs,
                                        sizes=(model_size_bytes(args.model), model_size_bytes(staged_path))))
        elif result.ir == "onnx":
            try:
                measured.update(measure_run(args.model, staged_path, driver.backend, data=eval_data, labels=labels,
                                            labels_key=args.labels, bench=args.bench, costs=costs))
            except DataError as exc:
                if eval_data is None:
                    raise
                raise DataError(f"--eval {args.eval}: {exc} (give data that fits the model's inputs)") from None
        else:  # a PyTorch model: size, parameters and MACs
            measured.update(cost_report(*costs))
            measured["size_bytes"] = {"before": model_size_bytes(args.model), "after": model_size_bytes(staged_path)}
            if eval_data is not None or args.bench:  # the input does not run on this backend: nothing to pair
                unmeasured.append(f"--eval / --bench not measured: the input is a PyTorch program, which "
                                  f"{driver.backend.name} does not run, so there is no before to compare (run "
                                  f"graphopt compare / bench on {output}, or --backend x86)")

    target = os.path.dirname(real(output))  # where the files go (a link's target's folder)
    existed = {real(os.path.join(target, n)) for n in os.listdir(target)}
    run = driver.run(args.model, output, graph=graph, before_move=measure)
    report_dir_existed = bool(args.report) and os.path.exists(args.report)
    json_existed = bool(args.json) and os.path.lexists(args.json)
    try:
        out, report, before = run.graph, run.report, run.source
        if reference.graph is not None and measured.get("_comparison") is not None:  # per layer, by FX node name
            measured["_comparison"].per_layer = per_layer_fx(reference.graph, out, eval_data)
            measured["comparison"]["per_layer"] = measured["_comparison"].per_layer.to_dict()
        # what was written: a PyTorch program saved as ONNX is described as the file (the export adds and folds nodes)
        after = load_model(output).describe() if out.ir == "fx" and output.lower().endswith(".onnx") \
            else out.describe()
        say(f"{args.model}: {before['ir']}, {before['nodes']} nodes, {before['parameters']:,} parameters")
        for note in getattr(graph, "notes", []):  # what loading changed: IR < 4 upgraded, inputs with defaults
            say(f"note: {note}")
        say(f"pipeline: {run.pipeline}" + (f"  (= {run.resolved})" if run.pipeline != run.resolved else ""))
        say(report.table())
        numeric = report.checks.get("numeric")
        if numeric and numeric.get("compared") and numeric["comparisons"]:
            say(f"check: {_check_line(numeric)}")
        report.warnings.extend(unmeasured)
        for warning in report.warnings:
            say(f"warning: {warning}")
        say(f"wrote {output}: {after['nodes']} nodes, {after['parameters']:,} parameters")
        for line in run.artifact.get("summary", []):  # the backend's facts about the file (x86: the lowering)
            say(line)
        say(format_run(measured))
        if original is not None:
            say(f"before: the input model run on {driver.backend.name} the same way (lowered like the result)")
        if args.json or args.report:
            from graphopt.report.report_dir import search_data

            data = {"input": {"path": args.model, **before, "notes": list(getattr(graph, "notes", []))},
                    "output": {"path": output, **after},
                    "backend": driver.backend.name, **run.to_dict(), **jsonable_run(measured),
                    **search_data(run.ctx.state)}
            # every target was checked before the passes: what fails now is the disk (full, gone)
            if args.json:
                atomic_write(args.json, json_text(data, default=_json_default), "--json")
            if args.report:
                from graphopt.report.report_dir import write_report_dir

                written = write_report_dir(args.report, json.loads(json_text(data, default=_json_default)),
                                           report.table())
                say(f"wrote the report into {args.report}: {', '.join(os.path.basename(p) for p in written)}")
    except BaseException:  # a failed or interrupted run leaves nothing behind: the files it created go (one it
        for path in run.written:  # replaced stays), and a report folder it made
            if real(path) not in existed and os.path.lexists(path):
                os.remove(path)
        if args.json and not json_existed and os.path.lexists(args.json):
            os.remove(args.json)
        if args.report and not report_dir_existed:
            shutil.rmtree(args.report, ignore_errors=True)
        raise
    return 0


def _check_line(numeric: dict) -> str:
    from graphopt.numeric import fmt_db

    comparisons = numeric["comparisons"]
    exact = [c for c in comparisons if c["equivalence"] == "exact"]
    parts = []
    if exact:
        worst = max(c["max_rel_err"] for c in exact)
        parts.append(f"exact passes keep the outputs: max rel. error {worst:.1e} <= {numeric['rtol']:g}")
    for c in comparisons:
        if c["equivalence"] != "exact":
            parts.append(f"{' + '.join(c['passes'])}: SQNR {fmt_db(c['sqnr_db'])} dB, cosine {c['cosine']:.4f}")
    there = numeric.get("on_backend")
    if there:
        parts.append(f"the written file on {there['backend']}: SQNR {fmt_db(there['sqnr_db'])} dB, cosine "
                     f"{there['cosine']:.4f}")
    return "; ".join(parts) + f", on {numeric['inputs']}"


def _json_default(value):
    return str(value)


def _image_options(args):
    image_flags = (args.calib_resize, args.calib_crop, args.calib_mean, args.calib_std)
    if not any(f is not None for f in image_flags):
        return None
    if not args.calib:
        raise UsageError("--calib-resize/--calib-crop/--calib-mean/--calib-std need --calib FOLDER of images")
    from graphopt.calib.sources import ImageOptions

    return ImageOptions(resize=args.calib_resize, crop=args.calib_crop,
                        mean=_floats(args.calib_mean, "--calib-mean"), std=_floats(args.calib_std, "--calib-std"))


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
    from graphopt.report.metrics import check_labelled

    check_labelled(data, labels, f"--eval {args.eval}: ")  # one class per sample, finite inputs (as compare)
    return data, labels


