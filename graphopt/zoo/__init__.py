"""Small reference networks built in code (no downloads) for examples, tests and benchmarks. Needs torch.

They follow the published architectures' layer patterns (conv -> BN -> ReLU, residual Adds, inverted residuals
with depthwise convs and ReLU6) so graph passes meet the same shapes as on the real models.
"""

from graphopt.zoo.cnn import mobilenet_v2_like, resnet18_like, resnet50_like, tiny_resnet
from graphopt.zoo.digits import DigitsCNN, accuracy, digits_data, train_digits_cnn
from graphopt.zoo.export import export_onnx
from graphopt.zoo.transformer import BertLike, bert_like, export_transformer_onnx

__all__ = [
    "BertLike", "DigitsCNN", "accuracy", "bert_like", "digits_data", "export_onnx", "export_transformer_onnx",
    "mobilenet_v2_like", "resnet18_like", "resnet50_like", "tiny_resnet", "train_digits_cnn",
]
