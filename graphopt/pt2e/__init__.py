"""The PyTorch route's quantization: graphopt's QuantScheme turned into PT2E annotations (torchao's
``prepare_pt2e`` / ``prepare_qat_pt2e`` / ``convert_pt2e`` do the graph surgery), graphopt's observers and fake
quantizers as PT2E observer modules, and quantization-aware training. torchao is imported lazily and quietly
(:mod:`graphopt.pt2e.torchao`)."""
