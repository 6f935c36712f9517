"""Build the example model the README runs: a small ResNet exported with BatchNorm kept (about a second).

    python examples/build_example.py            # writes examples/tiny_resnet.onnx
    python examples/build_example.py resnet18_like --shape 1x3x224x224

The export keeps BatchNormalization and skips the exporter's constant folding, as a model fresh out of
training typically is (torch.onnx.export with training=PRESERVE, do_constant_folding=False).
"""

from __future__ import annotations

import argparse
import os

from graphopt import zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default="tiny_resnet",
                        choices=["tiny_resnet", "resnet18_like", "resnet50_like", "mobilenet_v2_like"])
    parser.add_argument("--shape", default=None, help="input shape, e.g. 1x3x224x224")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.shape.split("x")) if args.shape else (
        (1, 3, 32, 32) if args.name == "tiny_resnet" else (1, 3, 224, 224))
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{args.name}.onnx")
    zoo.export_onnx(getattr(zoo, args.name)(), out, shape, keep_bn=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
