"""What this CPU offers int8 kernels, read from ``/proc/cpuinfo``: one home for the question both CPU backends ask.

x86 int8 kernels (onnxruntime's MLAS, oneDNN under inductor, fbgemm) multiply unsigned 8-bit activations by signed
8-bit weights. With AVX-512 VNNI, AVX-VNNI or AMX the products are accumulated in int32 (``vpdpbusd``, tiles); on
CPUs without them (AVX2 only, or AVX-512 without VNNI) the kernels use ``vpmaddubsw``, which adds two products in
an int16 and saturates when weights use the full int8 range. The backends then keep weights in [-64, 64]
(255 × 64 × 2 fits an int16), as onnxruntime's own quantizer does with ``reduce_range``.
"""

from __future__ import annotations

import platform
from functools import lru_cache

_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
# the int8 / bf16 instruction families worth naming in a report, in the order they are listed
NAMED_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else frozenset(flags)


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has an int8 dot product that accumulates in int32 (AVX-512 VNNI, AVX-VNNI, AMX); None
    when that cannot be read (not Linux). Not asked on other architectures: see :func:`u8s8_saturates`."""
    flags = cpu_flags()
    return None if flags is None else bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


def is_x86() -> bool:
    return platform.machine().lower() in _X86


def u8s8_saturates() -> bool:
    """Whether uint8 x int8 CPU kernels may saturate here (x86 without VNNI, or an x86 whose flags are unknown)."""
    return is_x86() and cpu_has_vnni() is not True


def int8_features() -> str:
    """The int8-relevant features of this CPU, for reports: ``"avx2, avx512f, avx512_vnni, amx_int8"``, or
    ``"unknown"``, and ``"(no VNNI: weights in [-64, 64])"`` where the kernels would saturate."""
    flags = cpu_flags()
    if flags is None:
        return f"unknown ({platform.machine()})"
    named = [f for f in NAMED_FEATURES if f in flags] or ["none of " + ", ".join(NAMED_FEATURES)]
    return ", ".join(named) + (" (no VNNI: weights in [-64, 64])" if u8s8_saturates() else "")
