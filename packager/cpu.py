"""The x86 instruction-set class of this machine, as ONNX Runtime's int8 kernels (MLAS) tell them apart.

u8s8 int8 products run on VNNI (vpdpbusd, exact int32 sums) on AVX-512 VNNI machines, and on vpmaddubsw (pairs
summed into int16, which saturates) on AVX2 and AVX-512 machines without VNNI: the same int8 graph can give
different numbers per class unless its weights leave room for the pair sums (7-bit weights).
"""

from __future__ import annotations

from pathlib import Path

CPU_CLASSES = ("avx2", "avx512", "avx512-vnni")  # oldest first


def cpu_class(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """This machine's class: avx512-vnni, avx512, avx2, or "other" (no AVX2, or not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "other"
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    if {"avx512f", "avx512bw", "avx512_vnni"} <= flags:
        return "avx512-vnni"
    if {"avx512f", "avx512bw"} <= flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "other"
