"""The tritonclient client the smoke and the bench share: one Client over HTTP or gRPC, protocol differences hidden."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from packager.triton import PROTOCOL_NAMES
from packager.triton.server import TritonServer
from packager.validate import Inputs

Outputs = dict[str, np.ndarray]

REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Wire:
    """How tritonclient speaks one protocol: its module, the server's address for it, and how to connect."""

    name: str
    module: ModuleType
    address: Callable[[TritonServer], str | None]
    as_json: dict  # keyword arguments that make metadata/config/statistics calls return dicts
    connect: Callable[[str, float], object]  # (url, HTTP network timeout in seconds) -> tritonclient client


PROTOCOLS: dict[str, Wire] = {
    "http": Wire(
        "http", httpclient, lambda server: server.http_url, {},
        lambda url, timeout_s: httpclient.InferenceServerClient(url, network_timeout=timeout_s),
    ),
    "grpc": Wire(
        "grpc", grpcclient, lambda server: server.grpc_url, {"as_json": True},
        lambda url, timeout_s: grpcclient.InferenceServerClient(url),
    ),
}  # fmt: skip
assert tuple(PROTOCOLS) == PROTOCOL_NAMES


class Client:
    """A tritonclient client over one wire; metadata, config and statistics come back as dicts."""

    def __init__(self, wire: Wire, url: str, timeout_s: float = REQUEST_TIMEOUT_S):
        self.wire, self.url = wire, url
        self._client = wire.connect(url, timeout_s)

    def close(self) -> None:
        self._client.close()

    def is_server_ready(self) -> bool:
        return self._client.is_server_live() and self._client.is_server_ready()

    def server_version(self) -> str:
        return self._client.get_server_metadata(**self.wire.as_json)["version"]

    def is_model_ready(self, name: str, version: str = "") -> bool:
        return self._client.is_model_ready(name, version)

    def metadata(self, name: str) -> dict:
        return self._client.get_model_metadata(name, **self.wire.as_json)

    def config(self, name: str) -> dict:
        config = self._client.get_model_config(name, **self.wire.as_json)
        return config.get("config", config)  # gRPC wraps it

    def load(self, name: str, config: dict) -> None:
        """(Re)load a model with `config` in place of its config.pbtxt (Triton's load-time override)."""
        self._client.load_model(name, config=json.dumps(config))

    def statistics(self, name: str) -> list[dict]:
        """Triton's inference statistics of the model, one dict per served version."""
        return self._client.get_inference_statistics(name, **self.wire.as_json)["model_stats"]

    def batch_counts(self, name: str) -> dict[int, int]:
        """Executions so far by batch size (the dynamic batcher's joins show as sizes above 1)."""
        counts: dict[int, int] = {}
        for version in self.statistics(name):
            for entry in version.get("batch_stats", []):
                size = int(entry["batch_size"])
                counts[size] = counts.get(size, 0) + int(entry["compute_infer"].get("count", 0))
        return counts

    def request(self, inputs: Inputs, outputs: list[str]) -> tuple[list, list]:
        """tritonclient inputs (data type from the array's dtype, so a wrong one can be sent) and outputs."""
        tensors = []
        for name, array in inputs.items():
            tensor = self.wire.module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return tensors, [self.wire.module.InferRequestedOutput(name) for name in outputs]

    def send(self, model: str, tensors: list, outputs: list, parameters: dict | None = None):
        """One inference with a `request`'s tensors and request parameters (an ensemble passes them to its steps);
        tritonclient's result (`as_numpy(name)` decodes an output)."""
        return self._client.infer(model, tensors, outputs=outputs, parameters=parameters)

    def infer(self, model: str, inputs: Inputs, outputs: list[str], parameters: dict | None = None) -> Outputs:
        result = self.send(model, *self.request(inputs, outputs), parameters=parameters)
        return {name: result.as_numpy(name) for name in outputs}


@contextmanager
def connection(wire: Wire, server: TritonServer, timeout_s: float = REQUEST_TIMEOUT_S) -> Iterator[Client]:
    """A client, closed on exit: an open keep-alive connection delays the server's shutdown."""
    with closing(Client(wire, wire.address(server), timeout_s)) as client:
        yield client


def infer_at_once(client: Client, model: str, requests: list[Inputs], outputs: list[str]) -> list[Outputs]:
    """Each request from its own thread and client (the HTTP client is not thread safe), released together."""
    start = threading.Barrier(len(requests))

    def send(inputs: Inputs) -> Outputs:
        with closing(Client(client.wire, client.url)) as own:
            start.wait(REQUEST_TIMEOUT_S)
            return own.infer(model, inputs, outputs)

    return in_threads(send, requests, len(requests))


def in_threads(function: Callable, items: list, workers: int) -> list:
    """`function` over `items` from up to `workers` threads, results in order. On an error or Ctrl-C nothing
    waits for the other threads: stopping the server ends their requests."""
    if not items:
        return []
    pool = ThreadPoolExecutor(max_workers=min(workers, len(items)))
    try:
        return list(pool.map(function, items))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def error_text(error: Exception) -> str:
    """Triton's (or the connection's) error as one line, without tritonclient's unknown request id."""
    message = error.message() if isinstance(error, InferenceServerException) else str(error)
    return " ".join((message or type(error).__name__).replace("[request id: <id_unknown>] ", "").split())
