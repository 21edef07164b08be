"""Live smoke test: serve a model repository from a real Triton server and check every model it can load.

The flow: load what the server can serve (triton.discovery), then over HTTP and over gRPC run the checks
(triton.checks) against the reference (triton.reference): PyTorch's answers and the Hugging Face tokenizer's tokens.
A model whose backend the server lacks is reported as not loadable, never passed in silence; a graph gated for
other CPU classes than this machine's fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from packager.console import table
from packager.cpu import cpu_class
from packager.errors import GateFailed, UsageError
from packager.triton.checks import Checks
from packager.triton.client import PROTOCOLS, Wire, connection
from packager.triton.discovery import Model, Role, load_servable
from packager.triton.reference import Reference
from packager.triton.rows import LOAD, CheckStatus, SmokeRow
from packager.triton.server import TritonServer, kept_log, serve

DETAIL_WIDTH = 110  # characters of a row's detail in the summary table
END_TO_END, CPU_CLASS = "text end to end", "cpu class"  # checks that are not per protocol


@dataclass(frozen=True)
class SmokeResult:
    """Every row of one smoke run."""

    rows: tuple[SmokeRow, ...]
    log_tail: str = ""  # the end of the server log when a check failed (empty when it could not be read)
    log: Path | None = None  # a copy of the server log that outlives the server, when a check failed

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    @property
    def failures(self) -> list[SmokeRow]:
        return [row for row in self.rows if not row.passed]

    @property
    def served(self) -> list[str]:
        return [row.model for row in self.rows if row.check == LOAD and row.status is CheckStatus.PASS]

    @property
    def not_loadable(self) -> dict[str, str]:
        """Model -> why this server cannot load it ("not loadable on this server: backend X missing")."""
        return {row.model: row.detail for row in self.rows if row.check == LOAD and row.status is CheckStatus.SKIP}

    def summary(self) -> str:
        """The models table, the checks table, and the full text of every failure."""
        models = [[row.model, _served_as(row.status), _shorten(row.detail)] for row in self.rows if row.check == LOAD]
        checks = [[row.check, row.protocol, row.model, row.status.value, _shorten(row.detail)] for row in self.rows]
        parts = [
            table(["model", "status", "detail"], models, title="Models in the repository"),
            table(["check", "protocol", "model", "result", "detail"], checks, title="Live smoke checks"),
        ]
        if self.failures:
            parts.append("\n".join(f"FAIL {r.check} [{r.protocol}] {r.model}: {r.detail}" for r in self.failures))
        if self.log_tail and self.failures:
            parts.append(f"last lines of the server log:\n{self.log_tail}")
        return "\n\n".join(parts)


def smoke(
    repository: Path | str,
    reference: Reference,
    launcher: str = "local",
    *,
    models: Iterable[str] | None = None,
    protocols: Sequence[str] = tuple(PROTOCOLS),
    **server_options,
) -> SmokeResult:
    """Serve `repository` with `launcher`, load every selected model it can, and check it over each protocol.

    `models` selects model folders (default: all); `server_options` go to `serve()` (launcher options such as
    `url`, `grpc_url`, `image`, `log_path`, and `ready_timeout_s`). The server is stopped before this returns.
    """
    unknown = [name for name in protocols if name not in PROTOCOLS]
    if unknown:
        raise UsageError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
    with serve(launcher, Path(repository), **server_options) as server:
        found, rows = load_servable(server, repository, models, server.backends)
        served = [found[row.model] for row in rows if row.check == LOAD and row.status is CheckStatus.PASS]
        rows.append(_end_to_end_row(served))
        if launcher != "url":  # a local or docker server computes on this machine
            rows += _cpu_rows(served)
        for name in protocols:
            rows += _check_protocol(PROTOCOLS[name], server, served, reference)
        failed = any(not row.passed for row in rows)
        log_tail, log = (server.log_tail(), kept_log(server)) if failed else ("", None)
    return SmokeResult(tuple(rows), log_tail, log)


def require(result: SmokeResult) -> SmokeResult:
    """The gate: return the result when every check passed, else raise naming the first failure."""
    if result.passed:
        return result
    first = result.failures[0]
    log = f" (server log: {result.log})" if result.log else ""
    raise GateFailed(
        f"live Triton smoke failed {len(result.failures)} check(s); first: {first.check} [{first.protocol}] "
        f"{first.model}: {_shorten(first.detail, 300)}{log}"
    )


def _end_to_end_row(served: list[Model]) -> SmokeRow:
    ensembles = [model.name for model in served if model.role is Role.ENSEMBLE]
    if ensembles:
        return SmokeRow(END_TO_END, "-", ", ".join(ensembles), CheckStatus.PASS, "served ensemble(s)")
    nothing = "no ensemble could be served: nothing takes text end to end"
    return SmokeRow(END_TO_END, "-", "-", CheckStatus.FAIL, nothing)


def _cpu_rows(served: list[Model]) -> list[SmokeRow]:
    """Every served graph was gated for this machine's CPU class (int8 numbers can differ per class)."""
    here, rows = cpu_class(), []
    for model in served:
        if model.manifest is None or model.gate is None:
            continue
        cpu = model.manifest.release.build.cpu
        passed = here in cpu.valid_for
        detail = (f"this machine is {here}; the graph holds its gate on {', '.join(cpu.valid_for)} "
                  f"(gated on {cpu.gated_on})")
        rows.append(SmokeRow(CPU_CLASS, "-", model.name, CheckStatus.PASS if passed else CheckStatus.FAIL, detail))
    return rows


def _check_protocol(wire: Wire, server: TritonServer, served: list[Model], reference: Reference) -> list[SmokeRow]:
    if wire.address(server) is None:
        return [SmokeRow("server ready", wire.name, "-", CheckStatus.SKIP, f"no {wire.name} address given")]
    takes_requests = [model for model in served if model.role in (Role.ENSEMBLE, Role.MODEL)]
    with connection(wire, server) as client:
        run = Checks(client, reference, served)
        return [
            run.attempt("server ready", "-", run.server_ready),
            *(row for model in served for row in run.describe(model)),
            *(row for model in served for row in run.answers(model)),
            *(run.attempt("concurrent = one by one", m.name, run.concurrent, m) for m in takes_requests),
            *(row for model in takes_requests for row in run.bad_requests(model)),
            run.unknown_model(takes_requests),
            *(run.attempt("healthy after bad requests", m.name, run.healthy, m) for m in takes_requests),
        ]


def _served_as(status: CheckStatus) -> str:
    return {CheckStatus.PASS: "served", CheckStatus.SKIP: "not loadable", CheckStatus.FAIL: "FAILED to load"}[status]


def _shorten(text: str, width: int = DETAIL_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
