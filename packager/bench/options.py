"""The benchmark's options: what to measure (`BenchOptions`) and how long (`Budget` in process, `LoadBudget`
served)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from packager.errors import UsageError
from packager.recipe import Recipe
from packager.triton import PROTOCOL_NAMES

Shape = tuple[int, int]  # batch, sequence


@dataclass(frozen=True)
class Budget:
    """In process: warmup calls per candidate, then rounds until either limit, in each of `passes`."""

    warmup: int = 3
    max_rounds: int = 50
    seconds: float = 8.0
    passes: int = 3

    def __post_init__(self):
        _require_positive(rounds=self.max_rounds, seconds=self.seconds, passes=self.passes)


@dataclass(frozen=True)
class LoadBudget:
    """Served: warmup requests per client, then requests until `max_requests` in all or `seconds`, per point."""

    warmup: int = 2
    max_requests: int = 600
    seconds: float = 3.0

    def __post_init__(self):
        _require_positive(requests=self.max_requests, point_seconds=self.seconds)


def _require_positive(**values: float) -> None:
    """UsageError naming the first value that is not above zero (as its command-line option)."""
    for name, value in values.items():
        if not value > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be above 0; got {value}")


@dataclass(frozen=True)
class BenchOptions:
    build_root: Path = Path("build")
    reports_root: Path = Path("reports")
    shapes: tuple[Shape, ...] | None = None  # in process; default: (1, opt sequence) and (opt batch, opt sequence)
    served_shapes: tuple[Shape, ...] | None = None  # default: (1, opt sequence); also measured in process
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    protocols: tuple[str, ...] = tuple(PROTOCOL_NAMES)
    budget: Budget = Budget()
    load: LoadBudget = LoadBudget()
    threads: int | None = None  # PyTorch and ONNX Runtime threads; default: all cores
    serve: bool = True
    launcher: str = "local"
    peak_size: int = 2048  # square matmul size for the peak
    command: str = ""  # recorded in the report

    def __post_init__(self):
        if not self.concurrency or min(self.concurrency) < 1:
            raise UsageError(f"--concurrency needs client counts >= 1; got {list(self.concurrency)}")
        unknown = [name for name in self.protocols if name not in PROTOCOL_NAMES]
        if unknown or not self.protocols:
            raise UsageError(f"--protocols must be among {', '.join(PROTOCOL_NAMES)}; got {list(self.protocols)}")

    def grid(self, recipe: Recipe) -> tuple[list[Shape], list[Shape]]:
        """(in-process shapes, served shapes); served shapes are measured in process too (their PyTorch baseline)."""
        profile = recipe.profile
        served = list(self.served_shapes or [(1, profile.sequence.opt)])
        in_process = list(self.shapes or [(1, profile.sequence.opt), (profile.batch.opt, profile.sequence.opt)])
        shapes = list(dict.fromkeys(in_process + served))
        for batch, sequence in shapes:
            if not (profile.batch.min <= batch <= profile.batch.max and
                    profile.sequence.min <= sequence <= profile.sequence.max):
                raise UsageError(f"shape {batch}x{sequence} is outside the profile of {recipe.name} (batch "
                                 f"{profile.batch.min}..{profile.batch.max}, sequence "
                                 f"{profile.sequence.min}..{profile.sequence.max})")
        return shapes, served
