"""Keys of ``PassContext.state`` the quantization passes hand results through, in pipeline order:
``insert-observers`` -> ``calibrate`` -> ``place-qdq``."""

OBSERVERS = "quant.observers"  # {tensor name: Observer}, set by insert-observers, filled by calibrate
RANGES = "quant.ranges"  # {tensor name: (low, high)}, set by calibrate, read by place-qdq
CALIBRATION = "quant.calibration"  # what the ranges came from: method, samples, synthetic, source (the report)
FLOAT_NODES = "quant.float_nodes"  # node names an accuracy budget keeps out of static int8 (fp32 or a fallback)
