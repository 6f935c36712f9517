"""`graphopt sensitivity MODEL --calib DATA`: int8 sensitivity per fusion group, and int8 under a budget.

Without a budget: calibrate once, then score each group (only it in int8; ``--all-but-one``: all but it) by the
output SQNR / cosine against fp32 on N samples and, with ``--eval`` labels, accuracy; a table sorted most sensitive
first, ``--plot`` a bar chart, ``--json`` the rows. The cost is printed before any trial runs, and ``--max-evals``
bounds it (a cheap proxy from one fully-int8 run picks the groups to evaluate). With ``--min-cosine`` and/or
``--max-drop``: the fewest most-sensitive groups kept float for the budget to hold (``--fallback FORMAT``: those
that still hold it in a format between int8 and float, e.g. int8-dynamic, run in it), and ``--recipe`` writes the
decision for ``graphopt run MODEL --recipe FILE --calib DATA``, in each backend's form
(:mod:`graphopt.recipe_forms`). The analysis is :mod:`graphopt.report.sensitivity`; the same one-line error
rules as :mod:`graphopt.cli` apply.
"""

from __future__ import annotations

import os

from graphopt.errors import UsageError


def add_sensitivity_command(sub, add_plugin_flags) -> None:
    p = sub.add_parser("sensitivity", help="int8 sensitivity per fusion group (table, bar chart), and int8 under "
                                           "an accuracy budget (--min-cosine / --max-drop, --recipe)")
    p.add_argument("model", help="an .onnx file, or a torch.export .pt2 program (with --backend x86)")
    p.add_argument("--calib", required=True, metavar="DATA", help="calibration data (.npz, .npy, folders)")
    p.add_argument("--eval", metavar="DATA.npz", help="the samples scored; with a labels array, accuracy too")
    p.add_argument("--labels", default="labels", metavar="KEY", help="the labels array in --eval (default: labels)")
    p.add_argument("--samples", type=int, default=64, help="samples each evaluation runs (default 64)")
    p.add_argument("--backend", default="onnxruntime", help="the target backend (default: onnxruntime)")
    p.add_argument("--pipeline", default="int8", help="the int8 pipeline whose placement is scored (default: int8)")
    p.add_argument("--max-evals", type=int, metavar="N",
                   help="evaluate at most N groups (the most sensitive by a cheap proxy); with a budget: N trials")
    p.add_argument("--all-but-one", action="store_true", help="score everything int8 but each group instead")
    p.add_argument("--min-cosine", type=float, metavar="0.99", help="budget: outputs' cosine vs fp32, at least")
    p.add_argument("--max-drop", type=float, metavar="0.5", help="budget: accuracy points below fp32 (--eval)")
    p.add_argument("--fallback", metavar="PASS", help="with a budget: try the groups kept float in this format "
                                                      "(a pass that takes exclude_nodes, with its options: "
                                                      "int8-dynamic, int4-weight:block_size=32); default: fp32")
    p.add_argument("--recipe", metavar="OUT.yaml", help="with a budget: write the decision, to replay with "
                                                         "graphopt run MODEL --recipe OUT.yaml --calib DATA")
    p.add_argument("--plot", metavar="OUT.png", help="a bar chart of the groups' scores")
    p.add_argument("--json", metavar="OUT.json", help="also write the results as JSON")
    p.add_argument("--executor", default="processes", metavar="SPEC",
                   help="where the evaluations run: inprocess, processes[:N] (default: one worker per core), ray "
                        "(a local head on loopback), ray://host:port; finished trials are kept, so a rerun resumes")
    add_plugin_flags(p)


def cmd_sensitivity(args) -> int:
    from graphopt.backends import get_backend
    from graphopt.cli_backend import _model_file, load_npz, registry_from_args
    from graphopt.executors import get_executor, parse_executor
    from graphopt.ir import model_reads
    from graphopt.paths import IOPlan, atomic_write
    from graphopt.report.budget import search_budget
    from graphopt.report.layers import json_text
    from graphopt.report.sensitivity import cost_line, prepare, sensitivity

    budget = args.min_cosine is not None or args.max_drop is not None
    if args.fallback and not budget:
        raise UsageError("--fallback is a format the budget search may choose: give --min-cosine and/or --max-drop")
    if args.recipe and not budget:
        raise UsageError("--recipe writes a budget's decision: give --min-cosine and/or --max-drop")
    if args.max_drop is not None and not args.eval:
        raise UsageError("--max-drop is in points of accuracy: give --eval labelled.npz")
    if budget and (args.all_but_one or args.plot):
        raise UsageError("--all-but-one and --plot go with the sensitivity table (no --min-cosine / --max-drop)")
    if args.samples < 1 or (args.max_evals is not None and args.max_evals < 1):
        raise UsageError("--samples and --max-evals must be >= 1")
    if args.min_cosine is not None and not -1 <= args.min_cosine <= 1:  # NaN fails both
        raise UsageError(f"--min-cosine is a cosine, in [-1, 1] (got {args.min_cosine})")
    if args.max_drop is not None and not args.max_drop >= 0:
        raise UsageError(f"--max-drop is points of accuracy, >= 0 (got {args.max_drop})")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise UsageError(f"--plot {args.plot}: the chart is a .png file")
    if args.plot:
        from graphopt.report.plots import need_matplotlib

        need_matplotlib("--plot")
    parse_executor(args.executor)  # a bad --executor said before the model is calibrated
    plan = IOPlan()
    for what, path in model_reads("input model", args.model):  # the file and its external data
        plan.read(what, path)
    plan.read("calibration data", args.calib)
    plan.read("--eval", args.eval)
    for flag in ("recipe", "plot", "json"):
        plan.write(f"--{flag}", getattr(args, flag))
    plan.check()
    registry = registry_from_args(args)
    backend = get_backend(registry, args.backend)
    _model_file(backend, args.model)  # an .onnx file for an ONNX backend, a .pt2 for x86 (the FX study)
    eval_data = labels = None
    if args.eval:
        eval_data = load_npz(args.eval)
        if args.labels in eval_data:
            from graphopt.report.metrics import check_labelled

            labels = check_labelled(eval_data, eval_data.pop(args.labels), f"--eval {args.eval}: ")
        elif args.max_drop is not None or args.labels != "labels":  # accuracy asked for, or labels named
            raise UsageError(f"{args.eval} has no labels array '{args.labels}' (it has: "
                             f"{', '.join(sorted(eval_data))}); name it with --labels")
        # else: samples to score cosine / SQNR on (a BERT-like model's held-out inputs), without accuracy
    kind = None
    if "fx" in backend.irs:  # a PyTorch backend (x86): the FX study
        from graphopt.report.sensitivity_fx import FxStudy as kind
    study = prepare(args.model, args.calib, registry=registry, backend=backend, pipeline=args.pipeline,
                    eval_data=eval_data, labels=labels, samples=args.samples, kind=kind, fallback=args.fallback or "")
    unplaced = study.unplaced
    print(f"{args.model}: {len(study.groups)} fusion groups in int8 on {backend.name} ({study.place_text})"
          + (f"; {len(unplaced)} more its placement leaves float there, not scored ({', '.join(unplaced[:4])}"
             f"{', ...' if len(unplaced) > 4 else ''})" if unplaced else ""))
    if not study.groups:  # no table, plot or recipe of nothing
        print(f"nothing to score: no op of this model runs in int8 on {backend.name} (its int8 form is the float "
              f"model)")
        return 0
    if budget:
        g = len(study.groups)
        n = 2 * g + 1 if not args.max_evals else min(2 * g + 1, args.max_evals)
        more = (f"; then each group kept float that {args.fallback} takes, tried in it: at most "
                f"{len(study.fallback_groups()) + 1} more") if args.fallback else ""
        print(f"cost: {g} groups -> at most {n} evaluations on {study.samples} samples (the fully-int8 model, then "
              f"the most sensitive groups by a cheap proxy kept float one more at a time, then each one kept float "
              f"tried back in int8){more}")
        with get_executor(args.executor, os.path.join(study.folder, "runs")) as executor:
            result = search_budget(study, min_cosine=args.min_cosine, max_drop=args.max_drop,
                                   max_evals=args.max_evals, executor=executor)
        print(result.describe())
        report = {"model": args.model, "backend": backend.name, "samples": study.samples,
                  "budget": result.budget, "holds": result.holds, "float_groups": result.float_groups,
                  "float_nodes": list(result.float_nodes), "fallback": result.fallback,
                  "fallback_groups": result.fallback_groups, "formats": result.formats(), "metrics": result.metrics,
                  "baseline": result.baseline, "fp32_accuracy": result.fp32_accuracy, "evaluations": result.evaluations}
        if args.recipe:
            from graphopt.recipe import recipe_text
            from graphopt.recipe_forms import backend_forms, replay_passes

            # the one decision, each backend's form
            forms = backend_forms(study, result.float_groups, args.model, result.fallback_groups)
            passes = replay_passes(study, result.excluded_nodes, fallback=study.fallback_passes(result.fallback_groups))
            atomic_write(args.recipe, recipe_text(model=args.model, passes=passes, backend=backend.name,
                                                  float_nodes=result.float_nodes, float_groups=result.float_groups,
                                                  metrics=result.metrics, budget=result.budget, forms=forms,
                                                  formats=result.formats(), fallback=result.fallback,
                                                  fallback_groups=result.fallback_groups, holds=result.holds),
                         "--recipe")
            others = ", ".join(k for k, f in forms.items() if f.get("available") and k != "x86")
            print(f"wrote {args.recipe}: replay with graphopt run {args.model} --recipe {args.recipe} "
                  f"--calib {args.calib}" + (f" (--backend {others}: that backend's form)" if others else ""))
            for name, form in forms.items():
                print(f"  {name}: " + _form_line(form))
    else:
        mode = "all-but-one" if args.all_but_one else "one"
        print(cost_line(study, mode, args.max_evals))
        with get_executor(args.executor, os.path.join(study.folder, "runs")) as executor:
            result = sensitivity(study, mode=mode, max_evals=args.max_evals, executor=executor)
        base = result.baseline
        fp32 = f", fp32 accuracy {result.fp32_accuracy:.2f}" if result.fp32_accuracy is not None else ""
        acc = f", accuracy {base['accuracy']:.2f}" if base.get("accuracy") is not None else ""
        print(f"all groups int8: output SQNR {base['sqnr_db']:.2f} dB, cosine {base['cosine']:.5f}{acc}{fp32}")
        print(result.table())
        report = {"model": args.model, "backend": backend.name, **result.to_dict()}
        if args.plot:
            result.plot(args.plot)
            print(f"wrote {args.plot}")
    if args.json:
        report["unplaced_groups"] = unplaced  # left float by the placement on this backend: not scored
        atomic_write(args.json, json_text(report), "--json")
    return 0


def _form_line(form: dict) -> str:
    """One backend's form in a line: what stays float there, and which float groups have no counterpart."""
    if not form.get("available"):
        return f"no form: {form.get('why')}"
    kept = form.get("module_paths", form.get("exclude_nodes")) or []
    what = "modules" if "module_paths" in form else "nodes"
    none = form.get("unmapped") or {}
    fallback = form.get("fallback") or {}
    return (f"{len(kept)} {what} {'out of static int8' if fallback else 'float'} ({', '.join(kept) or '-'})"
            + (f"; {', '.join(fallback['groups'])} in {fallback['format']}" if fallback.get("groups") else "")
            + (f"; {', '.join(fallback['float'])} float ({fallback['why']})" if fallback.get("float") else "")
            + (f"; no counterpart for {', '.join(none)}" if none else ""))
