"""Triton releases: the TensorRT a plan must be built with, and the driver the serving host needs (data only)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TritonRelease:
    """What a Triton release needs of a TensorRT plan and of the host that serves it."""

    tensorrt: str  # the full TensorRT version of its -py3 images (tritonserver, tensorrt): plans must match it
    driver: int  # the NVIDIA driver branch its CUDA requires (release notes, "Driver Requirements")
    trtllm_tensorrt: str  # its -trtllm-python-py3 image's TensorRT: another version, not the one plans target


# The Triton release a plan is built for. Sources: [notes] Triton release notes rel-YY-MM, "Driver Requirements";
# [compat] triton-inference-server/server docs/introduction/compatibility.md (its trtllm-python-py3 table only).
# The -py3 TensorRT versions are NOT verified here (their source, the Frameworks Support Matrix, was not readable):
# 24.10 and 24.12 match third-party reports, the others are unverified. The driver of 24.09, 24.11, 25.01 and 25.02
# is the branch of their CUDA as [compat] lists it, not read from their notes.
TRITON_RELEASES: dict[str, TritonRelease] = {
    "24.09": TritonRelease("10.4.0.26", 560, "10.4.0"),  # TensorRT unverified; CUDA 12.6.1; trtllm: [compat]
    "24.10": TritonRelease("10.5.0.18", 560, "10.4.0"),  # TensorRT third-party; [notes]: CUDA 12.6.2, 560; [compat]
    "24.11": TritonRelease("10.6.0.26", 560, "10.6.0"),  # TensorRT unverified; CUDA 12.6.3; trtllm: [compat]
    "24.12": TritonRelease("10.7.0.23", 560, "10.7.0"),  # TensorRT third-party; [notes]: CUDA 12.6.3, 560; [compat]
    "25.01": TritonRelease("10.8.0.43", 570, "10.8.0.43"),  # TensorRT: [compat]'s trtllm image only; CUDA 12.8.0
    "25.02": TritonRelease("10.8.0.43", 570, "10.8.0.43"),  # TensorRT: [compat]'s trtllm image only; CUDA 12.8.0
    "25.03": TritonRelease("10.9.0.34", 560, "10.9.0.34"),  # TensorRT: [compat]'s trtllm only; [notes]: 12.8.1, 560
}
# Older driver branches the same notes (24.10, 24.12, 25.03) allow on data-center GPUs only, through CUDA's forward
# compatibility package: branch -> its first release that works.
DATACENTER_DRIVERS: dict[int, str] = {470: "470.57", 525: "525.85", 535: "535.86", 545: "545.23"}


# The NGC release of the tritonserver (2.51.0) that the PyPI wheel nvidia-pytriton 0.7 ships: the local launcher's.
PYTRITON_RELEASE = "24.10"


def tritonserver_image(release: str) -> str:
    """NVIDIA's Triton server image of a release (all backends, python included)."""
    return f"nvcr.io/nvidia/tritonserver:{release}-py3"
