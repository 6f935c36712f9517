"""Every PNG graphopt draws, in one place: per-group / per-layer bars, a run's before/after bars and the Pareto front of
a search's candidates (accuracy against cost).

matplotlib is imported only when a plot is asked for, with the non-interactive Agg backend (no display, no
window: plots are files). One figure per file, 100 dpi; bars are horizontal, the worst on top.
Infinite values (identical tensors) are drawn as a long bar, capped at ``CAP_DB``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

CAP_DB = 150.0


def need_matplotlib(flag: str) -> None:
    """Refuse ``flag`` (``--report``, ``--plot``, ``plot=``) in one line, before any work, when matplotlib is not
    installed (it comes with the ``plots`` and ``dev`` extras, not with the base install)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        from graphopt.errors import UnsupportedError

        raise UnsupportedError(f"{flag} draws its charts with matplotlib, which is not installed: "
                               f"pip install 'graphopt[plots]' (or pip install matplotlib)")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _number(value) -> float | None:
    """A value from a report (a float, "inf"/"-inf" strings from JSON, None) as a float to draw, or None."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else max(-CAP_DB, min(value, CAP_DB))


def bars(labels: Sequence[str], values: Sequence[float], path: str, *, xlabel: str, title: str,
         color: str | Sequence[str] = "tab:red", legend: dict[str, str] | None = None) -> None:
    """Horizontal bars, the first label on top (callers pass the worst first); ``color``: one, or one per bar
    (``legend``: label -> color)."""
    plt = _pyplot()
    values = [_number(v) or 0.0 for v in values]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(labels) + 1.5))
    ax.barh(range(len(labels)), values, color=color)
    if legend:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=c, label=k) for k, c in legend.items()], fontsize=8, loc="lower right")
    ax.set_yticks(range(len(labels)), list(labels), fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def per_layer_bars(per_layer: dict[str, Any], path: str, top: int = 30) -> None:
    """The per-layer SQNR table of a run report (``comparison.per_layer``: rows worst first), its ``top`` rows."""
    rows = per_layer["layers"][:top]
    bars([f"{r['tensor']} ({r['op_type']})" for r in rows], [r["sqnr_db"] for r in rows], path,
         xlabel="SQNR vs the input model, dB (lower: more damaged)",
         title=f"per-layer SQNR, worst first ({len(rows)} of {len(per_layer['layers'])} layers, "
               f"{per_layer['samples']} samples)")


def before_after(report: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """The before/after pairs a run report holds: (name, unit, before, after) for size, and latency / accuracy
    when the run measured them."""
    pairs = []
    if "size_bytes" in report:
        s = report["size_bytes"]
        pairs.append(("size", "MB", s["before"] / 1e6, s["after"] / 1e6))
    if "latency_ms" in report:
        lat = report["latency_ms"]
        pairs.append((f"latency ({lat['statistic']}, batch {lat['batch']})", "ms", lat["before"], lat["after"]))
    accuracy = report.get("comparison", {}).get("accuracy")
    if accuracy:
        pairs.append(("top-1 accuracy", "%", 100 * accuracy["a"]["accuracy"], 100 * accuracy["b"]["accuracy"]))
    return pairs


def before_after_bars(report: dict[str, Any], path: str) -> None:
    """One panel per measured quantity (size, latency, accuracy), input model against the output."""
    plt = _pyplot()
    pairs = before_after(report)
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.2 * len(pairs), 3.2), squeeze=False)
    for ax, (name, unit, before, after) in zip(axes[0], pairs):
        ax.bar(["before", "after"], [before, after], color=["tab:gray", "tab:blue"])
        for x, v in enumerate((before, after)):
            ax.annotate(f"{v:.4g}", (x, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{name}\n{after / before:.2f}x" if before else name, fontsize=9)
        ax.set_ylabel(unit)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pareto(points: Sequence[dict[str, Any]], path: str, *, xlabel: str, ylabel: str, title: str,
           budget: float | None = None) -> None:
    """Accuracy against cost for every candidate of a search: ``points`` are dicts with ``cost`` and ``score`` (the
    axes), ``family`` (one colour each), ``on_front`` (the Pareto front, drawn as a step line) and ``chosen`` (marked
    with a star); ``budget``: the cost limit, a dashed vertical line. Points without a cost or score are left out."""
    plt = _pyplot()
    drawn = [p for p in points if _number(p.get("cost")) is not None and _number(p.get("score")) is not None]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for i, family in enumerate(dict.fromkeys(p.get("family", "") for p in drawn)):
        mine = [p for p in drawn if p.get("family", "") == family]
        ax.scatter([_number(p["cost"]) for p in mine], [_number(p["score"]) for p in mine], s=22, alpha=0.75,
                   color=f"C{i}", label=family or "candidates")
    front = sorted((_number(p["cost"]), _number(p["score"])) for p in drawn if p.get("on_front"))
    if front:
        ax.step([c for c, _ in front], [s for _, s in front], where="post", color="black", linewidth=1,
                label="Pareto front")
    for p in drawn:
        if p.get("chosen"):
            ax.scatter([_number(p["cost"])], [_number(p["score"])], marker="*", s=260, color="gold",
                       edgecolors="black", zorder=5, label="chosen")
    if budget is not None:
        ax.axvline(budget, color="tab:red", linestyle="--", linewidth=1, label=f"budget {budget:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def decision_bars(decision: dict[str, Any], path: str, top: int = 40) -> None:
    """An accuracy budget's decision: each group's proxy sensitivity (dB, most sensitive on top), colored by the
    format it runs in (int8, fp32, or the fallback)."""
    groups = [g for g in decision["groups"] if g.get("proxy_db") is not None][:top] or decision["groups"][:top]
    palette = {f: {"int8": "tab:blue", "fp32": "tab:red"}.get(f, "tab:orange")
               for f in dict.fromkeys(g["format"] for g in groups)}
    bars([g["group"] for g in groups], [g.get("proxy_db") or 0.0 for g in groups], path,
         xlabel="each group's own int8 noise, SQNR dB (lower: more sensitive)",
         title=f"int8 under {decision['budget']}: groups by sensitivity", color=[palette[g["format"]] for g in groups],
         legend=palette)
