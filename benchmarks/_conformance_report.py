"""The conformance run's summary: counts per mode, folder and class, the failures, and the failures grouped by
cause (their reasons with model-specific names and numbers blanked), for benchmarks/conformance.py."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

from _conformance_cases import FOLDERS

from graphopt.table import format_table

MODES = ("check", "no-check")
CLASSES = ("folded", "note", "refused", "WRONG", "CRASH")


def summarize(results: dict, modes=MODES) -> dict:
    """Counts per mode, folder and class, and the failures."""
    counts = {m: defaultdict(Counter) for m in modes}
    ort = defaultdict(Counter)
    failures = {m: [] for m in modes}
    for cid, r in results.items():
        folder = r["case"]["folder"]
        ort[folder]["total"] += 1
        if not (r["baseline"] or {}).get("runs"):
            continue
        ort[folder]["onnxruntime runs"] += 1
        for m in modes:
            run = r["runs"].get(m)
            if run is None:
                continue
            counts[m][folder][run["class"]] += 1
            if run["class"] in ("WRONG", "CRASH", "refused"):
                failures[m].append((run["class"], cid, run["reason"]))
    not_run = [("not run", cid, (r["baseline"] or {}).get("reason") or "no baseline")
               for cid, r in results.items() if not (r["baseline"] or {}).get("runs")]
    return {"onnxruntime": {f: dict(c) for f, c in ort.items()}, "not_run": _causes(not_run),
            "counts": {m: {f: dict(c) for f, c in fc.items()} for m, fc in counts.items()},
            "failures": {m: sorted(v, key=lambda t: (CLASSES.index(t[0]), t[1])) for m, v in failures.items()},
            "causes": {m: _causes(v) for m, v in failures.items()}}


def cause(reason: str) -> str:
    """A reason with its model-specific parts (paths, tensor and node names, numbers) blanked, to group runs by
    cause; the exit code and the pass name stay."""
    keep = re.match(r"(exit \d+: (pass '[^']*': )?)", reason or "")
    head = keep.group(1) if keep else ""
    text = re.sub(r"/\S*/(model|out)\.onnx", "<model>", (reason or "")[len(head):])
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    text = re.sub(r"\b(?![A-Z_]+\b)[\w./-]*[\d_/][\w./-]*", "…", text)  # names like conv1_b_0, a/b, 12
    return (head + text)[:160]


def _causes(failures: list) -> list:
    groups: dict[tuple, list] = defaultdict(list)
    for cls, cid, reason in failures:
        groups[(cls, cause(reason))].append(cid)
    return sorted(([cls, text, len(ids), ids] for (cls, text), ids in groups.items()), key=lambda g: -g[2])


def format_summary(summary: dict, modes=MODES, limit_causes: int = 40, passes: str = "fold") -> str:
    lines = []
    folders = [f for f in FOLDERS if f in summary["onnxruntime"]]
    rows = [("folder", "cases", "ort runs")]
    for f in folders:
        o = summary["onnxruntime"][f]
        rows.append((f, str(o.get("total", 0)), str(o.get("onnxruntime runs", 0))))
    lines.append(format_table(rows, right=(1, 2)))
    if summary["not_run"]:
        lines.append("onnxruntime does not run (count, cause, first models):")
        for _, text, n, ids in summary["not_run"][:limit_causes // 4]:
            lines.append(f"  {n:>4} {text}  [{', '.join(ids[:2])}{', ...' if n > 2 else ''}]")
    for m in modes:
        lines.append("")
        lines.append(f"mode {m}: graphopt run model.onnx --passes {passes} -o out.onnx"
                     + (" --no-check" if m == "no-check" else ""))
        rows = [("folder", *CLASSES)]
        total = Counter()
        for f in folders:
            c = summary["counts"][m].get(f, {})
            total.update(c)
            rows.append((f, *(str(c.get(k, 0)) for k in CLASSES)))
        rows.append(("all", *(str(total.get(k, 0)) for k in CLASSES)))
        lines.append(format_table(rows, right=range(1, len(CLASSES) + 1)))
    for m in modes:
        if summary["failures"][m]:
            lines.append("")
            lines.append(f"WRONG / CRASH / refused, mode {m}:")
            lines += [f"  {cls:<7} {cid}: {reason}" for cls, cid, reason in summary["failures"][m]]
    for m in modes:
        if summary["causes"][m]:
            lines.append("")
            lines.append(f"by cause, mode {m} (count, class, cause, first models):")
            for cls, text, n, ids in summary["causes"][m][:limit_causes]:
                lines.append(f"  {n:>4} {cls:<7} {text}  [{', '.join(ids[:3])}{', ...' if n > 3 else ''}]")
    return "\n".join(lines)
