"""QAT against the best post-training calibration, per-tensor weights, a narrow MobileNet-like net on digits (#9's bar).

    python benchmarks/bench_qat.py [--seeds 0,1,2] [--width 8] [--train-lr 0.04] [--train-epochs 10]
                                   [--qat-epochs 2] [--qat-lr 1e-3] [--markdown out.md] [--json out.json]

Per seed: the digits split; graphopt.zoo.DigitsMobileNet (inverted residuals, depthwise 3x3 convs, ReLU6) trained
with zoo.train_digits_cnn (Adam at ``--train-lr``, batch 64) — a high learning rate, which leaves some depthwise
channels dead with tiny BatchNorm variances, so that their folded weights are hundreds of times the others', as
in real MobileNets; that is what makes per-tensor weight scales fail. Then, on the x86 backend's scheme with
``per_channel=no``:

- PTQ: ``int8:method=M:per_channel=no`` for M in minmax, percentile, entropy, mse (512 calibration images); the
  best of them is the PTQ reference;
- QAT: ``int8-qat:per_channel=no`` (fixed scales) and ``int8-qat:per_channel=no:learn_scales=true`` (LSQ), each
  trained by graphopt.train.finetune (Adam, one-cycle lr peaking at ``--qat-lr``, ``--qat-epochs`` epochs).

Held-out accuracy of each (the Q/DQ graph, run eagerly). The bar: where the best PTQ loses >= 1 point against
fp32 (mean of the seeds), QAT wins back at least half of that drop.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import machine, versions, write_outputs

import graphopt
from graphopt import train, zoo

METHODS = ("minmax", "percentile", "entropy", "mse")


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return zoo.accuracy(model.eval()(torch.from_numpy(x)).numpy(), y)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--train-lr", type=float, default=0.04)
    p.add_argument("--train-epochs", type=int, default=10)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--qat-lr", type=float, default=1e-3)
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows, start = [], time.perf_counter()
    for seed in (int(s) for s in args.seeds.split(",")):
        data = zoo.digits_data(seed)
        x_train, y_train, x_test, y_test = data
        torch.manual_seed(seed)
        model = zoo.train_digits_cnn(epochs=args.train_epochs, seed=seed, data=data, lr=args.train_lr,
                                     model=zoo.DigitsMobileNet(width=args.width))
        common = dict(example_inputs=(torch.from_numpy(x_test[:1]),), calibration=x_train[:512], backend="x86",
                      check=False)
        row = {"seed": seed, "fp32": accuracy(model, x_test, y_test)}
        for method in METHODS:
            q = graphopt.optimize(model, f"int8:method={method}:per_channel=no", **common)
            row[method] = accuracy(q.model, x_test, y_test)
        row["ptq_best"] = max(row[m] for m in METHODS)

        def loop(module, seed=seed):
            return train.finetune(module, (x_train, y_train), epochs=args.qat_epochs, lr=args.qat_lr, seed=seed)

        for name, options in (("qat_fixed", ""), ("qat_lsq", ":learn_scales=true")):
            q = graphopt.optimize(model, f"int8-qat:per_channel=no{options}", qat=loop, **common)
            row[name] = accuracy(q.model, x_test, y_test)
        rows.append(row)
        print("  " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)

    def mean(key):
        return 100 * statistics.mean(r[key] for r in rows)

    drop = mean("fp32") - mean("ptq_best")
    lines = [f"{machine()}; {versions(('torchao',))}; {time.perf_counter() - start:.0f} s", "",
             f"DigitsMobileNet width {args.width}, trained {args.train_epochs} epochs at Adam lr {args.train_lr:g}; "
             f"x86 scheme, per-tensor weights; QAT {args.qat_epochs} epochs at lr {args.qat_lr:g}; held-out "
             f"accuracy %, seeds {args.seeds}", "",
             "| seed | fp32 | " + " | ".join(f"PTQ {m}" for m in METHODS) + " | best PTQ | QAT fixed | QAT LSQ |",
             "|---|---|" + "---|" * len(METHODS) + "---|---|---|"]
    for r in rows + [{"seed": "mean", **{k: mean(k) / 100 for k in rows[0] if k != "seed"}}]:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{100 * r[k]:.2f}" for k in
                                                       ("fp32", *METHODS, "ptq_best", "qat_fixed", "qat_lsq")) + " |")
    lines.append("")
    summary = {"drop": drop}
    for name in ("qat_fixed", "qat_lsq"):
        won = (mean(name) - mean("ptq_best")) / drop if drop > 0 else float("nan")
        summary[name] = won
        verdict = ("met" if won >= 0.5 else "not met") if drop >= 1 else "n/a (best PTQ drop < 1 point)"
        lines.append(f"- {name.replace('_', ' ')}: recovers {100 * won:.0f} % of the best PTQ's drop of {drop:.2f} "
                     f"points (bar: >= 50 %): {verdict}")
    write_outputs("\n".join(lines), {"rows": rows, "summary": summary}, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
