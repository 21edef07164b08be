"""Run the fleet manifest's tritonserver as rendered, on this machine: a published repository uploaded to a moto S3
server on loopback, then the wheel's tritonserver with the Deployment's args and env (ports swapped for free ones),
in poll and in explicit mode, until /v2/health/ready answers 200. Prints when the probes first answered, the
models' states and the memory (RSS) the server and its python stubs hold. Not a test (~50 s, a second server);
the README quotes its numbers.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/fleet_check.py model_repository
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3

from packager import manifests
from packager.recipe import load_recipe
from packager.triton import backends
from packager.triton.process import free_ports
from packager.triton.server import LocalLauncher

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def status(url: str) -> int | None:
    try:
        return urllib.request.urlopen(url, timeout=2).status
    except Exception as exc:  # refused, reset, or an HTTP error status
        return getattr(exc, "code", None)


def serve(endpoint: str, mode: str) -> None:
    recipe = load_recipe("bert", overrides={"deploy": {"model_control": mode, "poll_seconds": 2}})
    documents = {d["kind"]: d for m in manifests.render_manifests(recipe, "s3://models/fleet", endpoint)
                 for d in m.objects}
    (container,) = documents["Deployment"]["spec"]["template"]["spec"]["containers"]
    free = dict(zip((port.name for port in manifests.PORTS), free_ports(3)))
    swap = {f"--{port.name}-port={port.number}": f"--{port.name}-port={free[port.name]}" for port in manifests.PORTS}
    args = [swap.get(arg, arg) for arg in container["args"]]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}  # the Secret's keys are CREDENTIALS
    launcher, server_dir = LocalLauncher(), backends.wheel_server_dir()
    command = [str(server_dir / "bin" / "tritonserver"), *args, "--http-address=127.0.0.1",
               "--grpc-address=127.0.0.1", f"--backend-directory={launcher._backend_directory(server_dir)}"]
    print(f"{mode}: tritonserver {' '.join(args)}")
    base = f"http://127.0.0.1:{free['http']}"
    with open(f"fleet-check-{mode}.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**launcher._environment(), **env})
    start, first = time.monotonic(), {}
    try:
        while time.monotonic() - start < 180 and process.poll() is None and "ready" not in first:
            for probe in ("live", "ready"):
                if probe not in first and status(f"{base}/v2/health/{probe}") == 200:
                    first[probe] = round(time.monotonic() - start, 1)
            time.sleep(0.5)
        print(f"{mode}: first 200 from the probes after {first} s; exit status {process.poll()}")
        if "ready" in first:
            request = urllib.request.Request(f"{base}/v2/repository/index", data=b"{}", method="POST")
            states = sorted((m["name"], m["version"], m["state"]) for m in json.load(urllib.request.urlopen(request)))
            time.sleep(2)
            rss = subprocess.run(["ps", "-o", "rss=", "-g", str(process.pid)], capture_output=True, text=True).stdout
            print(f"{mode}: {states}; server and python stubs hold {sum(map(int, rss.split())) / 1024:.0f} MiB")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 2)
        process.wait(30)


def main(repository: Path) -> None:
    os.environ.update(CREDENTIALS)
    (port,) = free_ports(1)
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        while status(endpoint) is None:
            time.sleep(0.2)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="models")
        files = [p for p in repository.rglob("*") if p.is_file() and p.parent != repository]
        for path in files:
            s3.upload_file(str(path), "models", f"fleet/{path.relative_to(repository).as_posix()}")
        print(f"uploaded {len(files)} objects of {repository}")
        for mode in ("poll", "explicit"):
            serve(endpoint, mode)
    finally:
        moto.terminate()
        moto.wait()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
