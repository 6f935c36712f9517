"""Print the TensorRT placement-rule catalogue: ``python -m graphopt.backends.tensorrt_docs > docs/tensorrt_rules.md``.

A module of its own so that the rules need not import the backend that lists them (no import cycle).
"""

from graphopt.backends.tensorrt import TensorRTBackend
from graphopt.backends.tensorrt_rules import tensorrt_catalogue


def main() -> str:
    return tensorrt_catalogue(TensorRTBackend().lint_rules())


if __name__ == "__main__":
    print(main(), end="")
