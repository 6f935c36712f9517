"""Small reference networks built in code (no downloads) for examples, tests and benchmarks. Needs torch.

They follow the published architectures' layer patterns (conv -> BN -> ReLU, residual Adds, inverted residuals
with depthwise convs and ReLU6) so graph passes meet the same shapes as on the real models.
"""

from graphopt.zoo.cnn import mobilenet_v2_like, resnet18_like, resnet50_like, tiny_resnet
from graphopt.zoo.digits import DigitsCNN, DigitsMobileNet, accuracy, digits_data, finetune_digits_cnn, train_digits_cnn
from graphopt.zoo.export import export_onnx
from graphopt.zoo.more_cnn import (
    convnext_like,
    densenet_like,
    efficientnet_like,
    resnext_like,
    shufflenet_v2_like,
    squeezenet_like,
)
from graphopt.zoo.transformer import BertLike, bert_like, export_transformer_onnx

# Networks covering the layer patterns structured channel pruning must handle, each with an input shape it accepts
PRUNE_ZOO = {
    "tiny_resnet": (1, 3, 32, 32),
    "resnet18_like": (1, 3, 64, 64),
    "mobilenet_v2_like": (1, 3, 64, 64),
    "densenet_like": (1, 3, 64, 64),
    "resnext_like": (1, 3, 64, 64),
    "shufflenet_v2_like": (1, 3, 64, 64),
    "squeezenet_like": (1, 3, 64, 64),
    "efficientnet_like": (1, 3, 64, 64),
    "convnext_like": (1, 3, 64, 64),
}

__all__ = [
    "PRUNE_ZOO", "BertLike", "DigitsCNN", "DigitsMobileNet", "accuracy", "bert_like", "convnext_like", "densenet_like",
    "digits_data", "efficientnet_like", "export_onnx", "export_transformer_onnx", "finetune_digits_cnn",
    "mobilenet_v2_like", "resnet18_like", "resnet50_like", "resnext_like", "shufflenet_v2_like", "squeezenet_like",
    "tiny_resnet", "train_digits_cnn",
]
