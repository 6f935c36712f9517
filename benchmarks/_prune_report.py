"""bench_prune.py's Markdown: the MACs bar, coverage and latency tables and their verdicts, from the measurements
alone (the bar's limits come from ``meta["macs_bar"]``)."""

from __future__ import annotations

from typing import Any

from _prune_models import PRUNERS


def _mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _cell(row: dict[str, Any]) -> str:
    """Coverage cell: what happened to one pruner on one model."""
    if not row.get("ok"):
        return f"fails: {row.get('error', '')[:80]}".replace("|", "/")
    if not row.get("runs"):
        return f"pruned model does not run: {row.get('run_error', '')[:70]}".replace("|", "/")
    if not row.get("shape_ok"):
        return f"runs, output shape {tuple(row['out_shape'])} changed"
    return f"ok, MACs x{row['macs_ratio']:.3f}"


def _kept_whole(row: dict[str, Any]) -> str:
    """graphopt's 'N channel group(s) kept whole: reason' notes, the classifier's output left out: how many and
    the first reason."""
    count, reasons = 0, []
    for note in row.get("graphopt", {}).get("notes", []):
        head, sep, reason = note.partition(" channel group(s) kept whole: ")
        if not sep or reason.startswith("graph output"):
            continue
        count += int(head) if head.isdigit() else 1
        reasons.append(reason)
    return f"{count}, e.g. {reasons[0]}" if reasons else ""


def _ratio(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.3f}" if key in row else ""


def markdown(bar: list[dict[str, Any]], coverage: list[dict[str, Any]], lat: dict[str, Any] | None,
             meta: dict[str, Any]) -> str:
    ratio = meta["ratio"]
    lines = [f"### Structured pruning at ratio {ratio:g}: graphopt vs Torch-Pruning {meta['tp_version']} "
             "(MACs and parameters by graphopt's model_costs for every model)", ""]
    if bar:
        low, high = meta["macs_bar"]
        lines += [
            "| model | input | pruner | MACs | x MACs | params | x params | graphopt / TP MACs | TP's own count "
            "(MACs, x) | prune s |",
            "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
        ]
        for res in bar:
            base = res["base"]
            lines.append(f"| {res['model']} | {res['input']} | unpruned | {base['macs'] / 1e6:,.1f} M | 1 | "
                         f"{base['params'] / 1e6:.3f} M | 1 | | {base['tp_count'][0] / 1e6:,.1f} M | |")
            for name, row in res["pruners"].items():
                if "macs" not in row:
                    lines.append(f"| {res['model']} | | {name} | {_cell(row)} | | | | | | |")
                    continue
                v = res["verdict"].get(name, {})
                vs = f"{v['ratio']:.3f}" if "ratio" in v else ""
                own = ""
                if "tp_count" in row:
                    own = f"{row['tp_count'][0] / 1e6:,.1f} M, x{row['tp_count'][0] / base['tp_count'][0]:.3f}"
                lines.append(f"| {res['model']} | | {name} | {row['macs'] / 1e6:,.1f} M | {_ratio(row, 'macs_ratio')} "
                             f"| {row['params'] / 1e6:.3f} M | {_ratio(row, 'params_ratio')} | {vs} | {own} "
                             f"| {row.get('prune_s', 0):.1f} |")
        lines += ["", f"**MACs bar**: graphopt's MACs / Torch-Pruning's within {low}-{high}, "
                      "pruned model runs with the original output shape:", ""]
        for res in bar:
            parts = []
            for route, v in res["verdict"].items():
                parts.append(f"{route} {v['ratio']:.3f}: {_mark(v['pass'])}" if "ratio" in v
                             else f"{route}: FAIL ({v.get('error')})")
            lines.append(f"- {res['model']}: " + "; ".join(parts))
        lines.append("")
    if coverage:
        lines += ["#### Coverage: every PRUNE_ZOO model and the BERT-like encoder", "",
                  "| model | input | Torch-Pruning | graphopt ONNX | graphopt FX "
                  "| channel groups graphopt kept whole (besides the output's) |",
                  "|---|---|---|---|---|---|"]
        for res in coverage:
            p = res["pruners"]
            notes = _kept_whole(p["graphopt-onnx"])
            fx_notes = _kept_whole(p["graphopt-fx"])
            if fx_notes != notes:
                notes = "; ".join(f"{route}: {n}" for route, n in (("ONNX", notes), ("FX", fx_notes)) if n)
            lines.append(f"| {res['model']} | {res['input']} | {_cell(p['torch-pruning'])} | "
                         f"{_cell(p['graphopt-onnx'])} | {_cell(p['graphopt-fx'])} | {notes[:240].replace('|', '/')} |")
        ok = {name: sum(1 for r in coverage if r["pruners"][name].get("shape_ok") and r["pruners"][name].get("ok"))
              for name in PRUNERS}
        lines += ["", "Pruned and running with the original output shape: " + ", ".join(
            f"{name} {n}/{len(coverage)}" for name, n in ok.items()) + ".", ""]
    if lat:
        judged = True
        for block in lat["timings"].values():
            threads = block["threads"]
            lines += [f"#### onnxruntime fp32 latency, {lat['model']} {lat['input']}, batch 1, "
                      f"{threads or 'default (one per core)'} intra-op thread(s), {meta['repeat']} interleaved "
                      f"ABBA rounds x 2 x {meta['iters']} runs" + ("" if meta["spinning"] else ", worker spinning off")
                      + ("" if judged else " (control, not judged)"), "",
                      "| variant | median ms | p90 ms | x unpruned (per-round IQR) | MACs | size MB | how |",
                      "|---|---:|---:|---:|---:|---:|---|"]
            for v, row in lat["variants"].items():
                t = block["variants"].get(v)
                if t is None:
                    lines.append(f"| {v} | {_cell(row) if 'error' in row else 'not timed'} | | | | | |")
                    continue
                r, la = t["vs_unpruned"], t["latency"]
                lines.append(f"| {v} | {la['p50_ms']:.2f} | {la['p90_ms']:.2f} | {r['median']:.3f} "
                             f"({r['q25']:.3f}-{r['q75']:.3f}) | {row['macs'] / 1e6:,.1f} M | "
                             f"{row['size_bytes'] / 1e6:.1f} | {row['how']} |")
            lines += ["", ("**Latency bars**: " if judged else "Same ratios with this thread setting: ") + "; ".join(
                f"{v} / unpruned {e['ratio']:.3f} <= {e['bar']}: {_mark(e['pass'])}" if "ratio" in e
                else f"{v}: FAIL ({e.get('error')})" for v, e in block["verdicts"].items()), ""]
            judged = False
    lines += [
        "MACs: graphopt's `model_costs` (Conv/Linear/MatMul output elements x reduction size) on the FX graph of "
        "the pruned nn.Module (Torch-Pruning, graphopt-fx) or the pruned ONNX file (graphopt-onnx); `x` columns are "
        "ratios to the same model unpruned, counted the same way: for Torch-Pruning the unpruned module (the "
        "`unpruned` row), for graphopt its own `fold` output of the unpruned model on the same route (the same "
        "MACs; parameters without BatchNorm, which `fold` removes, so both parameter ratios measure pruning "
        "alone). TP's own count is `tp.utils.count_ops_and_params` on Torch-Pruning's "
        "model (it also counts BatchNorm, activations and pooling, and misses matmuls called as functions, such as "
        "attention's Q.K^T and P.V: hence lower on BERT).",
        "",
        f"Machine: {meta['machine']}; {meta['versions']}.",
    ]
    return "\n".join(lines) + "\n"
