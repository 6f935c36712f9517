"""``graphopt run --report DIR``: the run report as report.json, report.md and PNG plots, together in one folder.

report.json is the ``--json`` report; report.md is written from the same data (every number in it is one of
the JSON's, rounded for reading) and shows the plots: ``before_after.png`` (size, and latency with ``--bench``,
accuracy with ``--eval`` labels: input model against output) and ``per_layer_sqnr.png`` (the per-layer SQNR
table of ``--eval``, worst first) when the run has one, and ``pareto.png`` (accuracy against cost for every
candidate, the front drawn and the chosen point marked) with the candidates' table when a pass searched under a
budget: such a pass leaves its :meth:`graphopt.report.prune_search.SearchResult.to_dict` in ``ctx.state[SEARCH]``
and the run report carries it as ``search`` (:func:`search_data`; the last search of the run is drawn); and
``sensitivity.png`` with a per-group table when an accuracy budget decided which groups stay out of static int8
(:meth:`graphopt.report.budget.BudgetResult.report` in ``ctx.state[DECISION]``, carried as ``int8_decision``:
each group's proxy sensitivity, its format marked). The
folder is created if missing; the files are written into a temporary folder inside it and moved into place
together at the end, so a failure leaves none of them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from graphopt.errors import OutputError
from graphopt.report import plots

JSON, MARKDOWN, BEFORE_AFTER, PER_LAYER = "report.json", "report.md", "before_after.png", "per_layer_sqnr.png"
PARETO, SENSITIVITY = "pareto.png", "sensitivity.png"
FILES = (JSON, MARKDOWN, BEFORE_AFTER, PER_LAYER, PARETO, SENSITIVITY)  # every name --report may write
SEARCH = "search"  # the ctx.state key (and run report key) of a budgeted search's candidates
DECISION = "int8_decision"  # the ctx.state key (and run report key) of an accuracy budget's per-group decision


def search_data(state: dict[str, Any]) -> dict[str, Any]:
    """What a run's pass context holds for the report: a budgeted search's candidates (``search``) and an accuracy
    budget's decision (``int8_decision``), those the run has."""
    return {key: state[key] for key in (SEARCH, DECISION) if state.get(key)}


def report_markdown(data: dict[str, Any], passes_table: str = "", top: int = 20) -> str:
    """report.md from the run report ``data`` (the --json dict); ``passes_table``: the run's pass table (text)."""
    inp, out = data.get("input", {}), data.get("output", {})
    lines = ["# graphopt run report", "",
             f"- input: `{inp.get('path')}` ({inp.get('ir')}, {inp.get('nodes')} nodes, "
             f"{inp.get('parameters', 0):,} parameters)",
             f"- output: `{out.get('path')}` ({out.get('nodes')} nodes, {out.get('parameters', 0):,} parameters)",
             f"- pipeline: `{data.get('pipeline')}`" + (f" (= `{data['resolved']}`)" if data.get("resolved") not in
                                                         (None, data.get("pipeline")) else ""),
             f"- backend: {data.get('backend')}", "", "## Before and after", "",
             "| quantity | before | after | after / before |", "|---|---|---|---|"]
    if "size_bytes" in data:
        s = data["size_bytes"]
        lines.append(f"| size, bytes | {s['before']:,} | {s['after']:,} | {_ratio(s['before'], s['after'])} |")
    for key in ("params", "macs"):
        if key in data:
            v = data[key]
            lines.append(f"| {key if key == 'params' else 'MACs'} | {v['before']:,} | {v['after']:,} | "
                         f"{_ratio(v['before'], v['after'])} |")
    if "latency_ms" in data:
        lat = data["latency_ms"]
        lines.append(f"| latency, ms ({lat['statistic']}, batch {lat['batch']}, {lat['threads']} threads) | "
                     f"{lat['before']:.3f} | {lat['after']:.3f} | {_ratio(lat['before'], lat['after'])} |")
    comparison = data.get("comparison") or {}
    if comparison.get("accuracy"):
        a, b = comparison["accuracy"]["a"], comparison["accuracy"]["b"]
        lines.append(f"| top-1 accuracy, % ({a['total']} samples) | {100 * a['accuracy']:.2f} | "
                     f"{100 * b['accuracy']:.2f} | {100 * (b['accuracy'] - a['accuracy']):+.2f} points |")
    lines += ["", f"![before and after]({BEFORE_AFTER})"]
    if comparison.get("outputs"):
        lines += ["", f"## Outputs against the input model ({comparison['samples']} samples: {comparison['inputs']})",
                  "", "| output | SQNR dB | cosine | max rel. error |", "|---|---|---|---|"]
        for o in comparison["outputs"]:
            lines.append(f"| {o['name']} | {_db(o['sqnr_db'])} | {o['cosine']:.6f} | {o['max_rel_err']:.3e} |")
    per_layer = comparison.get("per_layer")
    if per_layer and per_layer.get("layers"):
        rows = per_layer["layers"]
        lines += ["", f"## Per-layer SQNR, worst first ({min(top, len(rows))} of {len(rows)} layers, "
                      f"{per_layer['samples']} samples)", "", "| tensor | op | SQNR dB | cosine |", "|---|---|---|---|"]
        lines += [f"| {r['tensor']} | {r['op_type']} | {_db(r['sqnr_db'])} | {r['cosine']:.6f} |" for r in rows[:top]]
        lines += ["", f"![per-layer SQNR]({PER_LAYER})"]
    if data.get(SEARCH):
        lines += [""] + _search_markdown(data[SEARCH])
    if data.get(DECISION):
        lines += [""] + _decision_markdown(data[DECISION])
    if passes_table:
        lines += ["", "## Passes", "", "```", passes_table, "```"]
    if data.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in data["warnings"]]
    return "\n".join(lines) + "\n"


def _search_markdown(search: dict[str, Any]) -> list[str]:
    budget, metric = search["budget"], search["metric"]
    lines = [f"## {search['title']}: {len(search['candidates'])} candidates", "",
             f"Budget: {budget['cost']} at most {budget['limit']:g}x the input's; chosen: the highest {metric} "
             f"within it. `*`: on the Pareto front.", "", f"![Pareto front]({PARETO})", "",
             "| # | family | ratios | MACs | latency | SQNR dB | cosine | accuracy | front | chosen |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, c in enumerate(search["candidates"], 1):
        lines.append(f"| {i} | {c['family']} | {c['ratios']} | {c['macs_ratio']:.3f} | "
                     f"{_num(c.get('latency_ratio'), 3)} | {_num(c.get('sqnr_db'), 2)} | {_num(c.get('cosine'), 5)} | "
                     f"{_num(c.get('accuracy'), 2)} | "
                     f"{'*' if c.get('on_front') else ''} | {'**chosen**' if c.get('chosen') else ''} |")
    return lines


def _decision_markdown(decision: dict[str, Any]) -> list[str]:
    m = decision["metrics"]
    lines = [f"## int8 under the budget {decision['budget']} ({'holds' if decision['holds'] else 'NOT met'})", "",
             f"Output cosine {m['cosine']:.5f}, SQNR {_db(m['sqnr_db'])} dB (fully int8: cosine "
             f"{decision['baseline']['cosine']:.5f}); {decision['evaluations']} trials. Groups, most sensitive first "
             f"by the proxy (each group's own int8 noise, dB):", "", f"![int8 sensitivity]({SENSITIVITY})", "",
             "| group | op | proxy dB | format |", "|---|---|---|---|"]
    lines += [f"| {g['group']} | {g['op']} | {_num(g['proxy_db'], 1)} | {g['format']} |" for g in decision["groups"]]
    return lines


def _num(value, digits: int) -> str:
    return value if isinstance(value, str) else ("-" if value is None else f"{value:.{digits}f}")


def _ratio(before, after) -> str:
    return f"{after / before:.3f}x" if before else "-"


def _db(value) -> str:
    return value if isinstance(value, str) else ("-" if value is None else f"{value:.2f}")


def write_report_dir(folder: str, data: dict[str, Any], passes_table: str = "", top: int = 20) -> list[str]:
    """Write report.json, report.md and the plots the run has into ``folder`` (see the module docstring);
    returns the paths written. Raises OutputError (nothing left behind) when the folder cannot be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".graphopt-", dir=folder)
    except OSError as exc:
        raise OutputError(f"--report {folder}: cannot write ({exc.strerror or exc})") from None
    try:
        with open(os.path.join(tmp, JSON), "w") as f:
            json.dump(data, f, indent=2, default=str)
        with open(os.path.join(tmp, MARKDOWN), "w") as f:
            f.write(report_markdown(data, passes_table, top))
        if plots.before_after(data):
            plots.before_after_bars(data, os.path.join(tmp, BEFORE_AFTER))
        per_layer = (data.get("comparison") or {}).get("per_layer")
        if per_layer and per_layer.get("layers"):
            plots.per_layer_bars(per_layer, os.path.join(tmp, PER_LAYER), top)
        if data.get(SEARCH):
            from graphopt.report.prune_search import plot_search

            plot_search(data[SEARCH], os.path.join(tmp, PARETO))
        if data.get(DECISION):
            plots.decision_bars(data[DECISION], os.path.join(tmp, SENSITIVITY))
        names = sorted(os.listdir(tmp), key=lambda n: n == JSON)  # report.json last: its presence means done
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
        return [os.path.join(folder, n) for n in names]
    except OSError as exc:
        raise OutputError(f"--report {folder}: cannot write ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
