"""Load from closed-loop clients, and Triton's own statistics of what it served: the machinery of the served
measurements."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager


from packager.bench.options import LoadBudget
from packager.errors import PackagerError
from packager.triton.client import REQUEST_TIMEOUT_S, Client, error_text

PHASES = ("queue", "compute_input", "compute_infer", "compute_output")  # Triton's per-request server-side times
STATISTICS_TIMEOUT_S, STATISTICS_INTERVAL_S = 60.0, 0.02  # until Triton has counted every request sent


def closed_loop(
    connect: Callable[[], AbstractContextManager[Callable[[bool], None]]], concurrency: int, budget: LoadBudget,
    when_ready: Callable[[], None] = lambda: None,
) -> tuple[list[float], float]:
    """`concurrency` threads, each with its own connection (`connect` yields a `call(check)`; tritonclient's HTTP
    client cannot change threads), warm up (checked calls), then `when_ready` runs and all are released together to
    call in a loop until `max_requests` in all or `seconds` have passed.

    Returns the latencies (ms) and the seconds from the release to the last completion. The first error of any
    thread stops every thread and is raised here.
    """
    lock = threading.Lock()
    ready, go = threading.Barrier(concurrency + 1), threading.Barrier(concurrency + 1)
    issued, latencies, errors, deadline = [0], [], [], [math.inf]

    def loop(call: Callable[[bool], None]) -> None:
        while not errors:
            with lock:
                if issued[0] >= budget.max_requests or time.perf_counter() > deadline[0]:
                    return
                issued[0] += 1
            began = time.perf_counter()
            call(False)
            with lock:
                latencies.append((time.perf_counter() - began) * 1000)

    def worker() -> None:
        try:
            with connect() as call:
                for _ in range(budget.warmup):
                    call(True)
                ready.wait(REQUEST_TIMEOUT_S)
                go.wait(REQUEST_TIMEOUT_S)
                loop(call)
        except threading.BrokenBarrierError:
            pass  # another thread failed first
        except Exception as exc:  # noqa: BLE001 - whatever a client thread meets is raised in the caller
            errors.append(exc)
            ready.abort()
            go.abort()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        ready.wait(REQUEST_TIMEOUT_S * (budget.warmup + 1))
        when_ready()
        began = time.perf_counter()
        deadline[0] = began + budget.seconds
        go.wait(REQUEST_TIMEOUT_S)
    except threading.BrokenBarrierError:
        began = time.perf_counter()
    for thread in threads:
        thread.join(max(0.0, began + budget.seconds + REQUEST_TIMEOUT_S - time.perf_counter()))
    seconds = time.perf_counter() - began
    if errors:
        raise PackagerError(f"a benchmark request failed: {error_text(errors[0])}")
    if any(thread.is_alive() for thread in threads) or not latencies:
        raise PackagerError(f"benchmark clients did not finish within {REQUEST_TIMEOUT_S:.0f} s of their time")
    return latencies, seconds


def counted(admin: Client, names: Sequence[str], since: dict[str, dict[str, int]],
             requests: int) -> dict[str, dict[str, int]]:
    """The statistics once every model has counted `requests` more than `since`: Triton counts a request just
    after its response is sent (each ensemble step counts each of the ensemble's requests once)."""
    deadline = time.monotonic() + STATISTICS_TIMEOUT_S
    while True:
        current = statistics(admin, names)
        behind = [name for name in names
                  if current[name].get("requests", 0) < since[name].get("requests", 0) + requests]
        if not behind:
            return current
        if time.monotonic() > deadline:
            raise PackagerError(f"Triton's statistics of {behind[0]} did not count {requests} requests within "
                                f"{STATISTICS_TIMEOUT_S:.0f} s")
        time.sleep(STATISTICS_INTERVAL_S)


def statistics(admin: Client, names: Sequence[str]) -> dict[str, dict[str, int]]:
    """Cumulative counters per model (all served versions summed)."""
    counters = {}
    for name in names:
        total: dict[str, int] = {}
        for version in admin.statistics(name):
            stats = version["inference_stats"]
            values = {"requests": stats["success"]["count"], "total": stats["success"]["ns"],
                      "inferences": version["inference_count"], "executions": version["execution_count"],
                      **{phase: stats[phase]["ns"] for phase in PHASES}}
            total = {key: total.get(key, 0) + int(value) for key, value in values.items()}
        counters[name] = total
    return counters
