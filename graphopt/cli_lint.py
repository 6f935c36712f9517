"""`graphopt verify --backend NAME MODEL`: check a Q/DQ model's placement against the backend's rules, and
`--fix` the safe ones.

One line per finding (``node: rule-id: message (fix: ...)``), then a summary with the count per rule. Without
``--strict`` the command reports and exits 0; with it, any finding exits 1 (after ``--fix``: any finding left in
the written model). ``--fix`` writes the fixed model to ``-o`` (default ``<model>.fixed.onnx`` beside it), never
over the input, and says what it changed and what it left. Split from :mod:`graphopt.cli`, which registers the
flags on ``verify``; the same one-line error rules apply.
"""

from __future__ import annotations

import os

from graphopt.errors import UsageError

FINDINGS_EXIT = 1  # --strict and something was found


def add_lint_flags(verify) -> None:
    verify.add_argument("--backend", metavar="NAME",
                        help="instead: check the Q/DQ placement against this backend's rules (tensorrt) and list "
                             "every finding by node and rule (docs/tensorrt_rules.md)")
    verify.add_argument("--strict", action="store_true", help="with --backend: exit 1 when anything is found")
    verify.add_argument("--fix", action="store_true",
                        help="with --backend: apply the safe fixes and write the result to -o")
    verify.add_argument("-o", "--output", help="--fix's output (default: beside the model, .fixed.onnx)")
    verify.add_argument("--calib", metavar="DATA",
                        help="--fix: calibration data (.npz, ...) for the fixes that quantize a tensor from its range")
    verify.add_argument("--json", metavar="PATH", help="with --backend: also write the findings as JSON")


def wants_lint(args) -> bool:
    """Whether ``verify`` checks a placement (--backend) rather than the model's validity; lint flags without
    --backend are a usage error."""
    if args.backend:
        return True
    extra = [flag for flag, on in (("--strict", args.strict), ("--fix", args.fix), ("-o", args.output),
                                   ("--calib", args.calib), ("--json", args.json)) if on]
    if extra:
        raise UsageError(f"{', '.join(extra)}: placement-check options; give --backend NAME (e.g. tensorrt)")
    return False


def default_fixed(path: str) -> str:
    root, _ = os.path.splitext(path)
    return f"{root}.fixed.onnx"


def cmd_lint(args) -> int:
    from graphopt.backends import get_backend
    from graphopt.backends.lint import FixContext, apply_fixes, calibrated_ranges, lint, summary_line
    from graphopt.cli_backend import _onnx_file, registry_from_args
    from graphopt.ir import model_reads
    from graphopt.ir.onnx_graph import OnnxGraph
    from graphopt.paths import IOPlan, atomic_write
    from graphopt.report.layers import json_text

    if (args.output or args.calib) and not args.fix:
        raise UsageError("-o and --calib go with --fix")
    registry = registry_from_args(args)
    backend = get_backend(registry, args.backend)
    rules = backend.lint_rules()
    if not rules:
        with_rules = sorted(n for n, b in registry.backends.items() if b.lint_rules())
        raise UsageError(f"backend '{backend.name}' has no placement rules to check "
                         f"(backends with rules: {', '.join(with_rules) or 'none'})")
    output = (args.output or default_fixed(args.model)) if args.fix else None
    plan = IOPlan()
    for what, path in model_reads("input model", args.model):  # the file and its external data
        plan.read(what, path)
    plan.read("calibration data", args.calib)
    plan.write("-o", output)
    plan.write("-o (its external data)", output + ".data" if output else None)
    plan.write("--json", args.json)
    plan.check()

    graph = OnnxGraph.from_model(_onnx_file(args.model))
    findings = lint(graph, rules)
    for finding in findings:
        print(finding.line())
    print(f"{args.model}: {backend.name} placement: {summary_line(findings)}")
    report = {"model": args.model, "backend": backend.name, "findings": [f.to_dict() for f in findings]}
    left = findings

    if args.fix:
        ranges = (lambda names: calibrated_ranges(graph, names, args.calib)) if args.calib else None
        fixed = graph.copy()
        outcome = apply_fixes(fixed, rules, FixContext(ranges=ranges))
        for line in outcome.applied:
            print(f"fixed: {line}")
        for line in outcome.left:
            print(f"not fixed: {line}")
        report["fix"] = {"applied": outcome.applied, "left": outcome.left, "output": None}
        if outcome.applied:
            fixed.save(output)
            left = lint(fixed, rules)
            print(f"wrote {output}: {summary_line(left)}")
            report["fix"].update(output=output, remaining=[f.to_dict() for f in left])
        else:
            print("nothing fixed: no file written")
    if args.json:
        atomic_write(args.json, json_text(report), "--json")
    return FINDINGS_EXIT if args.strict and left else 0
