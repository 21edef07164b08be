"""The benchmark's report: bench.json, bench.md (the tables) and bench.png (p50 latency against throughput)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from packager.bench.flops import Peak
from packager.bench.in_process import LEVEL_PRECISION, PYTORCH, InProcess, Latency
from packager.bench.options import Shape
from packager.bench.served import PHASES, Served, ServedResult
from packager.errors import PackagerError

REPORT_FILES = {"json": "bench.json", "markdown": "bench.md", "plot": "bench.png"}
IN_PROCESS_COLOURS = ("black", "dimgray", "darkgoldenrod", "saddlebrown", "purple")  # the served lines use C0..C9


@dataclass
class Report:
    model: str
    created: str
    command: str
    settings: dict
    machine: dict
    peaks: dict[str, Peak]
    flops: dict[Shape, float]
    in_process: list[InProcess]
    served: ServedResult | None
    build_folder: str

    def pytorch(self, batch: int, sequence: int) -> InProcess:
        return next(m for m in self.in_process if m.candidate == PYTORCH and (m.batch, m.sequence) == (batch, sequence))

    def ratios(self, batch: int, sequence: int, latency: Latency) -> dict[str, float]:
        """p50 and throughput against PyTorch eager at the same shape, both > 1 when faster than PyTorch."""
        reference = self.pytorch(batch, sequence).latency
        return {"p50_vs_pytorch": reference.p50_ms / latency.p50_ms,
                "throughput_vs_pytorch": latency.inferences_per_s / reference.inferences_per_s}

    def compute(self, batch: int, sequence: int, latency: Latency, precision: str) -> dict[str, float]:
        """Achieved GFLOP/s (the model's FLOPs × inferences/s) and its share of the peak of its precision."""
        gflops = self.flops[(batch, sequence)] * latency.inferences_per_s / 1e9
        peak = self.peaks.get(precision)
        return {"gflops_per_s": gflops} | ({"percent_of_peak": 100 * gflops / peak.gflops} if peak else {})

    def to_dict(self) -> dict:
        def derived(row, precision):
            return self.ratios(row.batch, row.sequence, row.latency) | self.compute(
                row.batch, row.sequence, row.latency, precision) | {
                "sequences_per_s": row.latency.inferences_per_s * row.batch}

        served = None
        if self.served:
            precision = LEVEL_PRECISION.get(self.served.shipped_level, "fp32")
            served = {
                "server_version": self.served.server_version,
                "shipped_level": self.served.shipped_level,
                "not_served": self.served.not_served,
                "points": [dataclasses.asdict(p) | {"server": [t.to_dict() for t in p.server]} | derived(p, precision)
                           | ({"average_batch": p.average_batch} if p.average_batch else {})
                           for p in self.served.points],
                "mixed_lengths": [dataclasses.asdict(p) for p in self.served.mixed],
            }
        return {
            "model": self.model, "created": self.created, "command": self.command, "build": self.build_folder,
            "settings": self.settings, "machine": self.machine,
            "peaks": {name: dataclasses.asdict(peak) for name, peak in self.peaks.items()},
            "flops": {f"{b}x{s}": value for (b, s), value in self.flops.items()},
            "in_process": [dataclasses.asdict(m) | derived(m, m.precision) for m in self.in_process],
            "served": served,
        }

    def in_process_table(self) -> str:
        rows = []
        for m in self.in_process:
            low, high = m.speedup_range
            ratio = self.ratios(m.batch, m.sequence, m.latency)
            compute = self.compute(m.batch, m.sequence, m.latency, m.precision)
            rows.append([m.candidate, f"{m.batch}×{m.sequence}", *_latency_cells(m.latency, m.batch),
                         f"{m.speedup:.2f}× ({low:.2f}–{high:.2f})", f"{ratio['throughput_vs_pytorch']:.2f}×",
                         *_compute_cells(compute, m.precision), m.parity])
        headers = ["configuration", "batch×seq", "p50 ms", "p90 ms", "p99 ms", "inf/s", "seq/s",
                   "p50 vs PyTorch (passes)", "throughput vs PyTorch", "GFLOP/s", "% of peak", "parity"]
        return markdown_table(headers, rows)

    def served_table(self) -> str:
        precision = LEVEL_PRECISION.get(self.served.shipped_level, "fp32")
        rows = []
        for p in self.served.points:
            ratio = self.ratios(p.batch, p.sequence, p.latency)
            compute = self.compute(p.batch, p.sequence, p.latency, precision)
            phases = " / ".join(f"{p.phase_ms(phase):.2f}" for phase in PHASES)
            batch = f"{p.average_batch:.2f}" if p.average_batch else "–"
            rows.append([p.protocol, f"{p.input} → {p.model} ({p.backend})", "on" if p.dynamic_batching else "off",
                         f"{p.batch}×{p.sequence}", p.concurrency, *_latency_cells(p.latency, p.batch),
                         f"{ratio['p50_vs_pytorch']:.2f}×", f"{ratio['throughput_vs_pytorch']:.2f}×",
                         *_compute_cells(compute, precision), phases, batch])
        headers = ["protocol", "input → model (backend)", "dynamic batching", "batch×seq", "clients", "p50 ms",
                   "p90 ms", "p99 ms", "inf/s", "seq/s", "p50 vs PyTorch", "throughput vs PyTorch", "GFLOP/s",
                   "% of peak", "server ms: queue / input / infer / output", "avg batch"]
        return markdown_table(headers, rows)

    def backends_table(self) -> str:
        """Each served backend side by side with the shipped graph in process, dynamic batching on: p50 and
        sequences/s per protocol, input, shape and client count, and each backend's p50 over the in-process p50."""
        points = [p for p in self.served.points if p.dynamic_batching]
        names = list(dict.fromkeys(p.backend for p in points))
        shipped = f"onnxruntime {self.served.shipped_level}"
        by_key = {(p.protocol, p.input, p.batch, p.sequence, p.concurrency, p.backend): p for p in points}
        rows = []
        for protocol, kind, batch, sequence, clients in dict.fromkeys(key[:5] for key in by_key):
            local = next((m.latency for m in self.in_process
                          if m.candidate == shipped and (m.batch, m.sequence) == (batch, sequence)), None)
            served = [by_key.get((protocol, kind, batch, sequence, clients, name)) for name in names]
            cells = [f"{p.latency.p50_ms:.1f} / {p.latency.inferences_per_s * batch:.1f}" if p else "–"
                     for p in served]
            ratios = [f"{p.latency.p50_ms / local.p50_ms:.2f}×" if p and local else "–" for p in served]
            rows.append([protocol, kind, f"{batch}×{sequence}", clients,
                         f"{local.p50_ms:.1f}" if local else "–", *cells, *ratios])
        headers = ["protocol", "input", "batch×seq", "clients", f"in process ({shipped}) p50 ms",
                   *(f"{name}: p50 ms / seq/s" for name in names), *(f"{name} p50 / in process" for name in names)]
        return markdown_table(headers, rows)

    def mixed_table(self) -> str:
        """Mixed-length clients through each ensemble, the tokenizer padding to length buckets or to the longest."""
        rows = [[p.protocol, f"text → {p.model} ({p.backend})", "buckets" if p.buckets else "longest", p.clients,
                 *_latency_cells(p.latency, 1), f"{p.average_batch:.2f}" if p.average_batch else "–"]
                for p in self.served.mixed]
        headers = ["protocol", "input → model (backend)", "tokenizer pads to", "clients", "p50 ms", "p90 ms",
                   "p99 ms", "inf/s", "seq/s", "avg batch"]
        return markdown_table(headers, rows)

    def markdown(self) -> str:
        peaks = "; ".join(f"{p.precision} **{p.gflops:.0f} G{'FLOP' if p.precision != 'int8' else 'OP'}/s** "
                          f"({p.method})" for p in self.peaks.values())
        flops = ", ".join(f"{b}×{s}: {value / 1e9:.2f} GFLOP" for (b, s), value in self.flops.items())
        machine = self.machine
        parts = [
            f"# Benchmark: {self.model}",
            f"`{self.command}` — {self.created}, build `{self.build_folder}`.",
            f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads for PyTorch and ONNX "
            f"Runtime; torch {machine['packages'].get('torch')}, onnxruntime {machine['packages'].get('onnxruntime')}. "
            "Shared and noisy machines move every number by tens of percent between runs: read the ratios, which "
            "are measured in the same run, and medians.",
            "## This machine's limit",
            f"Peak: {peaks}; the better of a measurement before and one after the benchmark (other load only "
            "lowers it: above 100% means it was busy both times). Model FLOPs per inference (matrix products "
            f"counted on the ONNX graph): {flops}.",
            "## In process",
            "PyTorch eager and ONNX Runtime on the build's gated graphs, one call each per round (rotated), "
            f"{self.settings['passes']} passes; p50 is the median of the pass medians, the ratio its median over "
            "passes (range in brackets). % of peak uses the peak of the graph's precision.",
            self.in_process_table(),
        ]
        if self.served:
            served = self.served
            skipped = "; ".join(f"{name}: {why}" for name, why in served.not_served.items())
            parts += [
                "## Served by Triton",
                f"tritonserver {served.server_version} ({self.settings['launcher']} launcher, loopback), the shipped "
                f"'{served.shipped_level}' graph. Closed-loop clients in this process, each point at most "
                f"{self.settings['max_requests']} requests or {self.settings['point_seconds']} s. Ratios are against "
                "PyTorch eager at the same batch×sequence, one call at a time. Server times are Triton's statistics "
                "per request, summed over the models a request runs through; avg batch is what the model executed."
                + (f" Not served here: {skipped}." if skipped else ""),
                "### Backends side by side",
                "Dynamic batching on. The ensemble (text in) includes the tokenizer model; in process is the shipped "
                "graph on ONNX Runtime in this process with the same tokens, one call at a time.",
                self.backends_table(),
                "### Every point",
                self.served_table(),
            ]
            if served.mixed:
                lengths = ", ".join(map(str, served.mixed[0].lengths))
                parts += [
                    "### Mixed lengths: what length buckets do",
                    f"{served.mixed[0].clients} closed-loop clients, each sending one text of its own length "
                    f"({lengths} tokens), dynamic batching on, through each ensemble: the tokenizer padding to "
                    "length buckets (as published), then to each request's longest text (reloaded without buckets). "
                    "A backend that joins equal shapes only joins requests that share a padded length.",
                    self.mixed_table(),
                ]
            parts += [
                f"![latency against throughput]({REPORT_FILES['plot']})",
            ]
        return "\n\n".join(parts) + "\n"

    def plot(self, path: Path) -> Path:
        """p50 latency against sequences/s: a line per served configuration over its client counts (one colour per
        protocol, input, backend and shape; dashed without dynamic batching), a point per in-process candidate and
        shape."""
        try:
            from matplotlib.figure import Figure
            from matplotlib.ticker import FuncFormatter
        except ImportError:
            raise PackagerError("the benchmark plot needs matplotlib: pip install '.[bench]'") from None
        figure = Figure(figsize=(10, 6.5), layout="constrained")
        axes = figure.subplots()
        shapes = dict(zip(dict.fromkeys((m.batch, m.sequence) for m in self.in_process), itertools.cycle("s^vDPX*")))
        candidates = dict(zip(dict.fromkeys(m.candidate for m in self.in_process), itertools.cycle(IN_PROCESS_COLOURS)))
        for m in self.in_process:
            axes.scatter([m.latency.inferences_per_s * m.batch], [m.latency.p50_ms], s=60,
                         marker=shapes[(m.batch, m.sequence)], color=candidates[m.candidate],
                         label=f"{m.candidate} {m.batch}×{m.sequence} (in process)")
        colours = itertools.cycle(f"C{index}" for index in range(10))
        lines: dict[tuple, list[Served]] = {}
        for p in self.served.points if self.served else []:
            lines.setdefault((p.protocol, p.input, p.model, p.backend, p.batch, p.sequence, p.dynamic_batching),
                             []).append(p)
        line_colours: dict[tuple, str] = {}
        for (protocol, kind, model, backend, batch, sequence, batching), points in lines.items():
            points.sort(key=lambda p: p.concurrency)
            x = [p.latency.inferences_per_s * p.batch for p in points]
            y = [p.latency.p50_ms for p in points]
            colour = line_colours.setdefault((protocol, kind, backend, batch, sequence), next(colours))
            axes.plot(x, y, marker="o", color=colour, linestyle="-" if batching else "--",
                      label=f"{protocol} {kind}→{model} ({backend}) {batch}×{sequence}, "
                            f"batching {'on' if batching else 'off'}")
            for p, xi, yi in zip(points, x, y):
                axes.annotate(str(p.concurrency), (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
        axes.set_xscale("log")
        axes.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        for axis in (axes.xaxis, axes.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(plain)
        axes.set_xlabel("throughput, sequences/s (log)")
        axes.set_ylabel("p50 latency, ms (log)")
        axes.set_title(f"{self.model}: latency against throughput (numbers: concurrent clients)")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        figure.savefig(path, dpi=110)
        return path

    def write(self, folder: Path) -> dict[str, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = {kind: folder / name for kind, name in REPORT_FILES.items()}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        paths["markdown"].write_text(self.markdown())
        self.plot(paths["plot"])
        return paths


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def _latency_cells(latency: Latency, batch: int) -> list[str]:
    return [f"{latency.p50_ms:.1f}", f"{latency.p90_ms:.1f}", f"{latency.p99_ms:.1f}",
            f"{latency.inferences_per_s:.1f}", f"{latency.inferences_per_s * batch:.1f}"]


def _compute_cells(compute: dict[str, float], precision: str) -> list[str]:
    percent = compute.get("percent_of_peak")
    return [f"{compute['gflops_per_s']:.1f}", f"{percent:.0f}% {precision}" if percent is not None else "–"]
