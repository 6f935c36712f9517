"""A BERT-like encoder in plain torch, for the MatMul/Gemm-heavy case (dynamic int8, fp16). Needs torch.

The layer pattern follows BERT-base: token + position (+ token-type) embeddings and a LayerNorm; per layer,
multi-head self-attention with explicit Linear q/k/v/out projections, scaled dot-product scores, a softmax and a
residual LayerNorm, then a GELU feed-forward block (hidden -> 4 x hidden -> hidden) with another residual
LayerNorm; a pooler (Linear + tanh on the first token) and a Linear classifier. No ``nn.MultiheadAttention``:
written out, the exported graph holds the MatMuls and Gemms a real exported BERT holds. Random init, fixed seed.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.heads, self.head_dim = heads, hidden // heads
        self.q, self.k, self.v, self.out = (nn.Linear(hidden, hidden) for _ in range(4))

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, H) -> (B, heads, S, head_dim)
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        b, _, s, _ = context.shape
        return self.out(context.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class EncoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.attention = SelfAttention(hidden, heads)
        self.norm1 = nn.LayerNorm(hidden, eps=1e-12)
        self.ffn_in, self.ffn_out = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.ffn_out(nn.functional.gelu(self.ffn_in(x))))


class BertLike(nn.Module):
    """``forward(input_ids)``: int64 token ids (batch, seq) -> logits (batch, num_classes)."""

    def __init__(self, vocab: int = 1000, hidden: int = 256, layers: int = 4, heads: int = 4, max_seq: int = 512,
                 num_classes: int = 2, ffn: int | None = None):
        super().__init__()
        self.token = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(max_seq, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, ffn or 4 * hidden) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.norm(self.token(input_ids) + self.position(positions))
        for layer in self.layers:
            x = layer(x)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


def bert_like(vocab: int = 1000, hidden: int = 256, layers: int = 4, heads: int = 4, seq: int = 128,
              num_classes: int = 2, seed: int = 0) -> BertLike:
    """A BERT-like encoder classifier in eval mode. ``seq`` is the longest sequence it takes (position table).

    Weights are drawn from ``seed`` with BERT's scale (normal, std 0.02); biases and the LayerNorm affine
    parameters are drawn too (std 0.02 around 0 and 1), as in a trained model: zero biases and unit gains would
    be identical tensors the exporter merges into one initializer, a graph no real model has."""
    gen = torch.Generator().manual_seed(seed)
    model = BertLike(vocab, hidden, layers, heads, max_seq=seq, num_classes=num_classes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.02)
            if isinstance(module, nn.Linear):
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.02)
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + torch.randn(module.weight.shape, generator=gen) * 0.02)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.02)
    return model.eval()


def export_transformer_onnx(model: nn.Module, path: str, batch: int = 1, seq: int = 128, dynamic: bool = True,
                            opset: int = 17) -> str:
    """Export with the TorchScript exporter (``dynamo=False``): input ``input_ids`` (int64, batch x seq),
    output ``logits``; with ``dynamic`` the batch and sequence axes are symbolic (``batch``, ``sequence``)."""
    model = model.eval()
    vocab = getattr(getattr(model, "token", None), "num_embeddings", 2)  # example ids any vocabulary takes
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    kwargs = dict(input_names=["input_ids"], output_names=["logits"], opset_version=opset, dynamo=False)
    if dynamic:
        kwargs["dynamic_axes"] = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}}
    torch.onnx.export(model, (ids,), path, **kwargs)
    return path
