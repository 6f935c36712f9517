"""`graphopt bench` and `graphopt compare`: the backend's commands (latency, and how far one model is from another).

Split from :mod:`graphopt.cli`, which registers them; the same one-line error rules apply.
"""

from __future__ import annotations

import os

from graphopt.errors import InputError, UsageError


def add_backend_option_flags(parser, run: bool = False) -> None:
    """The flags that set a backend's options (``--backend NAME:key=value`` sets any of them): the precision hint on
    every command; on ``run``, also the engine-build and IR flags."""
    parser.add_argument("--ov-precision", choices=("f32", "bf16"),
                        help="backend openvino: the inference precision hint (its 'precision' option; default f32, "
                             "so fp32 runs in fp32: OpenVINO's own default is bf16 on CPUs with AMX)")
    if not run:
        return
    parser.add_argument("--shapes", metavar="x:1x3x224x224/8x3x224x224/32x3x224x224",
                        help="min/opt/max input shapes for a backend that builds engines (its 'shapes' option); "
                             "inputs separated by ','")
    parser.add_argument("--emit-trtexec", action="store_true",
                        help="write the backend's engine build as a trtexec command instead of building (its "
                             "'emit_trtexec' option)")
    parser.add_argument("--save-ir", metavar="DIR",
                        help="backend openvino: also write the OpenVINO IR (NAME.xml / NAME.bin) into DIR (its "
                             "'save_ir' option)")


def backend_from_args(args, registry=None):
    """The backend ``--backend`` names, with the options its flags set; a flag the backend has no option for is a
    usage error naming the backend's options."""
    from graphopt.backends import get_backend

    flags = {"precision": ("--ov-precision", getattr(args, "ov_precision", None)),
             "shapes": ("--shapes", getattr(args, "shapes", None)),
             "emit_trtexec": ("--emit-trtexec", getattr(args, "emit_trtexec", False) and "true"),
             "save_ir": ("--save-ir", getattr(args, "save_ir", None))}
    return get_backend(registry or registry_from_args(args), args.backend,
                       {k: v for k, v in flags.items() if v[1]})


def add_backend_commands(sub, add_plugin_flags) -> None:
    bench = sub.add_parser("bench", help="latency percentiles of a model on a backend, per batch size and threads")
    bench.add_argument("model", help="an .onnx file (backend x86: an AOTInductor package or a torch.export .pt2)")
    bench.add_argument("--backend", default="onnxruntime", help="a registered backend (default: onnxruntime)")
    bench.add_argument("--batch", default="1", metavar="1,8",
                       help="batch sizes, comma-separated (default 1); they fill the symbolic first dimension")
    bench.add_argument("--threads", default=str(os.cpu_count() or 1), metavar="1,2",
                       help=f"intra-op thread counts, comma-separated (default: all {os.cpu_count() or 1} cores)")
    bench.add_argument("--iters", type=int, default=50, help="timed runs per row (default 50)")
    bench.add_argument("--warmup", type=int, default=10, help="untimed runs before them (default 10)")
    bench.add_argument("--shape", action="append", default=[], metavar="NAME=Nx3x64x64",
                       help="an input's shape, N standing for the batch size (default: the model's, symbolic "
                            "dims after the first set to 1); repeat per input")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    add_backend_option_flags(bench)
    add_plugin_flags(bench)

    compare = sub.add_parser("compare", help="how far model B's outputs are from model A's (SQNR, top-1, accuracy)")
    compare.add_argument("a", help="the reference model (.onnx; backend x86: a .pt2 package or program)")
    compare.add_argument("b", help="the model compared against it (.onnx; backend x86: a .pt2)")
    compare.add_argument("--data", metavar="DATA.npz",
                         help="inputs: one array per input name, samples on the first axis (default: fixed-seed "
                              "random samples)")
    compare.add_argument("--labels", metavar="KEY",
                         help="the array of integer labels in --data (default: 'labels' when present); prints the "
                              "accuracy of A and B")
    compare.add_argument("--samples", type=int, default=16, help="random samples without --data (default 16)")
    compare.add_argument("--per-layer", action="store_true",
                         help="also SQNR of every intermediate tensor the two models share by name, worst first")
    compare.add_argument("--top", type=int, default=20, help="per-layer rows printed (default 20; --json has all)")
    compare.add_argument("--backend", default="onnxruntime", help="a registered backend (default: onnxruntime)")
    compare.add_argument("--json", metavar="PATH", help="also write the comparison as JSON")
    add_backend_option_flags(compare)
    add_plugin_flags(compare)


def registry_from_args(args):
    """The plugin registry the command line's --no-plugins / -p flags ask for."""
    from graphopt.errors import PluginError
    from graphopt.plugins import load_registry

    registry = load_registry(autoload=False if args.no_plugins else None, extra=args.plugins)
    for name in args.plugins:  # a plugin asked for by name must load: silence would run without it
        if name in registry.failed:
            raise PluginError(f"-p {name}: the plugin could not be loaded ({registry.failed[name]})")
    return registry


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{flag} '{text}' is not a comma-separated list of positive integers, like 1,8")
    return values


def _shape_overrides(items: list[str]) -> dict[str, list[int | None]]:
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = [None if d.strip().lower() in ("n", "b") else int(d) for d in dims.lower().split("x")]
            if any(d is not None and d < 1 for d in shape):
                raise ValueError
        except ValueError:
            raise UsageError(f"--shape '{item}' is not like input=Nx3x224x224 (N: the batch size)") from None
        shapes[name] = shape
    return shapes


def _model_file(backend, path: str):
    """The model file a backend runs: for an ONNX backend the ModelProto (:func:`_onnx_file`), else the path (the
    backend's session gives the one-line errors)."""
    if "onnx" in backend.irs:
        return _onnx_file(path)
    from graphopt.errors import ModelLoadError
    from graphopt.paths import require_regular

    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: is a directory, not a model file")
    require_regular(path, "model")
    return path


def _onnx_file(path: str):
    """An .onnx file as a ModelProto, with the one-line errors `graphopt run` gives for bad models."""
    from graphopt.errors import ModelLoadError
    from graphopt.ir.onnx_graph import OnnxGraph
    from graphopt.ir.torch_files import looks_like_torch_file, torch_file_kind
    from graphopt.paths import require_regular

    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: is a directory, not an ONNX file")
    require_regular(path, "model")
    if looks_like_torch_file(path):
        torch_file_kind(path)  # a zip or pickle that is no PyTorch model (an .npz) is said as such
        raise UsageError(f"{path}: a PyTorch file, not ONNX (run it with --backend x86)")  # readable: another backend
    return OnnxGraph.load(path).to_model()  # graphopt's loader: its checks of the file and its external data


def _check_json(path: str | None, models: list[tuple[str, str]], data: tuple[str, str | None] = ("", None)) -> None:
    """Before any work: --json is none of the files the command reads (its models and their external data, its
    data), and its folder is writable."""
    if path is None:
        return
    from graphopt.ir import model_reads
    from graphopt.paths import IOPlan

    plan = IOPlan(outputs=[("--json", path)])
    for what, model in models:
        for each in model_reads(what, model):
            plan.read(*each)
    plan.read(*data)
    plan.check()


def _write_json(path: str, data) -> None:
    from graphopt.paths import atomic_write
    from graphopt.report.layers import json_text

    atomic_write(path, json_text(data), "--json")


def cmd_bench(args) -> int:

    batches, threads = _int_list(args.batch, "--batch"), _int_list(args.threads, "--threads")
    if args.iters < 1 or args.warmup < 0:
        raise UsageError(f"--iters must be at least 1 and --warmup at least 0 (got {args.iters}, {args.warmup})")
    shapes = _shape_overrides(args.shape)
    _check_json(args.json, [("input model", args.model)])
    backend = backend_from_args(args)
    _model_file(backend, args.model)  # a missing or broken file gets graphopt's own one-line error
    result = backend.bench(args.model, batches, threads, warmup=args.warmup, iters=args.iters, shapes=shapes)
    print(f"{args.model}: {result.size_bytes:,} bytes; backend {backend.name}; {args.warmup} warm-up + "
          f"{args.iters} timed runs per row, fixed-seed inputs")
    for batch, feeds in result.input_shapes.items():
        print(f"  batch {batch}: " + ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in feeds.items()))
    at_one = _dims_timed_at_one(args.model, shapes)
    if at_one:
        print(f"  note: dynamic {', '.join(at_one)} timed at 1, which says little of a real size: give "
              f"--shape NAME=Nx... for the size you run")
    for label, values in result.settings.items():
        print(f"  {backend.name} {label}: " + ", ".join(f"{k} {v}" for k, v in values.items()))
    print(result.table())
    if args.json:
        _write_json(args.json, result.to_dict())
    return 0


def _dims_timed_at_one(model: str, shapes) -> list[str]:
    """The ONNX model's dynamic dims past the batch that the timing filled with 1 (no --shape for their input)."""
    if not str(model).lower().endswith(".onnx"):
        return []
    from graphopt.ir import load_model
    from graphopt.report.cost import dims_at_one

    try:
        return dims_at_one(load_model(model), given=shapes or {})
    except Exception:  # a note, not a check: the timing itself succeeded
        return []


def load_npz(path: str) -> dict:

    import numpy as np

    from graphopt.errors import first_line
    from graphopt.paths import require_regular

    require_regular(path, "data")
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # whatever a damaged or foreign file makes numpy raise: the file is named
        raise InputError(f"{path}: not a readable .npz file ({first_line(exc)})") from None
    if not hasattr(archive, "files"):
        raise InputError(f"{path}: a single array, not an .npz archive of named arrays (np.savez(path, name=array))")
    try:
        with archive:
            return {k: archive[k] for k in archive.files}
    except Exception as exc:  # a bad CRC, an unknown compression, a pickled member
        raise InputError(f"{path}: not a readable .npz file ({type(exc).__name__}: {first_line(exc)})") from None


def cmd_compare(args) -> int:
    from graphopt.backends.base import DataError, model_size_bytes
    from graphopt.report.metrics import compare_models, outputs_table

    if args.samples < 1 or args.top < 0:
        raise UsageError(f"--samples must be at least 1 and --top at least 0 (got {args.samples}, {args.top})")
    if args.labels and not args.data:
        raise UsageError("--labels names an array in --data; give --data too")
    _check_json(args.json, [("model A", args.a), ("model B", args.b)], ("--data", args.data))
    backend = backend_from_args(args)
    model_a, model_b = _model_file(backend, args.a), _model_file(backend, args.b)
    data = labels = None
    labels_key = args.labels or "labels"
    if args.data:
        data = load_npz(args.data)
        if labels_key in data:
            labels = data.pop(labels_key)
        elif args.labels:
            raise UsageError(f"{args.data} has no array '{args.labels}' (it has: {', '.join(sorted(data))})")
        import numpy as np

        for name, values in data.items():  # NaN in, NaN out in both: 'inf dB' would say nothing about the models
            if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
                raise InputError(f"{args.data}: array '{name}' holds NaN or infinite values (compare models on "
                                 f"finite inputs)")
            if np.iscomplexobj(values):  # a float model would get its real part only
                raise InputError(f"{args.data}: array '{name}' is complex ({values.dtype}); give real inputs")
    try:
        result = compare_models(model_a, model_b, data, labels, labels_key=labels_key, samples=args.samples,
                                per_layer=args.per_layer, backend=backend, data_label=f"{args.data}")
    except DataError as exc:  # labels, shapes: the file they came from is named
        raise DataError(f"--data {args.data}: {exc} (give data that fits the models)" if args.data else str(exc)) \
            from None
    print(f"A: {args.a} ({model_size_bytes(args.a):,} bytes)  [reference]")
    print(f"B: {args.b} ({model_size_bytes(args.b):,} bytes)")
    print(f"inputs: {result.inputs}" + (f", {result.samples} samples" if args.data else ""))
    inputs = backend.input_specs(backend.session(model_a)) if isinstance(model_a, str) else model_a.graph.input
    unused = sorted(set(data or {}) - {i.name for i in inputs})
    if unused:
        print(f"note: {args.data}: not used: {', '.join(unused)} (not model inputs; labels are read from "
              f"'{labels_key}', see --labels)")
    print(outputs_table(result.outputs, result.samples))
    if result.accuracy:
        acc = result.accuracy
        print(f"accuracy on {result.samples} labelled samples ('{acc['labels']}'): A {acc['a']}  B {acc['b']}  "
              f"(B - A: {100 * (acc['b'].accuracy - acc['a'].accuracy):+.2f} points)")
    if result.per_layer is not None:
        layers = result.per_layer
        shown = min(args.top, len(layers.rows))
        print(f"per-layer SQNR of B against A on {layers.samples} samples, worst first ({shown} of {len(layers.rows)} "
              f"matched tensors shown; {len(layers.unmatched)} only in A, ignored):")
        if layers.rows and shown:
            print(layers.table(args.top))
    if args.json:
        _write_json(args.json, {"a": {"path": args.a, "size_bytes": model_size_bytes(args.a)},
                                "b": {"path": args.b, "size_bytes": model_size_bytes(args.b)},
                                "backend": backend.name, **result.to_dict()})
    return 0
