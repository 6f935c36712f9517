"""What this CPU offers int8 kernels, read from ``/proc/cpuinfo``: one home for the question both CPU backends ask.

x86 int8 kernels (onnxruntime's MLAS, oneDNN under inductor, fbgemm) multiply unsigned 8-bit activations by signed
8-bit weights. With AVX-512 VNNI, AVX-VNNI or AMX the products are accumulated in int32 (``vpdpbusd``, tiles); on
CPUs without them (AVX2 only, or AVX-512 without VNNI) the kernels use ``vpmaddubsw``, which adds two products in
an int16 and saturates when weights use the full int8 range. The backends then keep weights in [-64, 64]
(255 × 64 × 2 fits an int16), as onnxruntime's own quantizer does with ``reduce_range``.
"""

from __future__ import annotations

import hashlib
import platform
from functools import lru_cache

_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
# the int8 / bf16 instruction families worth naming in a report, in the order they are listed
NAMED_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


@lru_cache(maxsize=2)
def _cpuinfo_field(key: str) -> str | None:
    """The first ``key : value`` line's value in Linux ``/proc/cpuinfo``; None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(key)), None)
    except OSError:
        return None


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); None where they cannot be read."""
    flags = _cpuinfo_field("flags")
    return None if flags is None else frozenset(flags.split())


def cpu_identity() -> str:
    """This CPU's model name and a hash of its feature flags: what a cached timing is keyed on (a timing is only
    reused on the same kind of CPU)."""
    digest = hashlib.sha256(" ".join(sorted(cpu_flags() or ())).encode()).hexdigest()[:16]
    return f"{_cpuinfo_field('model name') or platform.processor() or platform.machine()} flags:{digest}"


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
