"""Triton's onnxruntime backend for the local launcher: the cache key, how the launcher finds a build, one-line
errors, and (with TRITON_SRC naming the sources tarball, as CI sets it) a real build from cold, then cached."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("pytriton", reason="the local launcher needs nvidia-pytriton")

from packager.cli import main
from packager.errors import PackagerError
from packager.triton import backends
from packager.triton.server import available_backends
from tests.live_server import REQUIRE_NATIVE

APT_LINE = "apt-get install cmake g++ make rapidjson-dev patchelf"


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """An empty cache folder of this test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return backends.cache_root()


def fake_build(cache: Path, key: str) -> Path:
    """A cache entry as `build()` leaves it (the record is written last)."""
    folder = cache / key / backends.BACKEND
    folder.mkdir(parents=True)
    (folder / backends.BACKEND_LIBRARY).write_bytes(b"")
    (cache / key / backends.RECORD).write_text(json.dumps({"created": "earlier", "seconds": 12.0}))
    return folder


def run_cli(capsys, *argv):
    code = main(list(argv))
    return code, *capsys.readouterr()


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_the_local_launcher_has_the_onnxruntime_backend_once_built_for_its_runtime(cache):
    assert backends.find() is None and available_backends("local") == {"python"}
    key = backends.runtime().key
    fake_build(cache, "0123456789abcdef-000000000000")  # another ORT library or server
    (cache / f"{key}-111111111111" / backends.BACKEND).mkdir(parents=True)  # unfinished: no record
    assert backends.find() is None
    built = fake_build(cache, f"{key}-222222222222")
    assert backends.find() == built and available_backends("local") == {"python", "onnxruntime"}


def test_the_cache_key_covers_the_ort_library_and_the_server():
    runtime = backends.runtime()
    assert runtime.ort_library.name == f"libonnxruntime.so.{runtime.ort_version}"
    assert runtime.server_library.startswith("libtritonserver") and runtime.server.startswith("nvidia-pytriton ")
    other_library = backends.Runtime(runtime.ort_library, runtime.ort_version, "0" * 64, runtime.server,
                                     runtime.server_library)
    other_server = backends.Runtime(runtime.ort_library, runtime.ort_version, runtime.ort_sha256, "another server",
                                    runtime.server_library)
    assert len({runtime.key, other_library.key, other_server.key}) == 3


def test_a_build_of_the_same_inputs_is_a_no_op(cache, tmp_path, monkeypatch, capsys):
    tarball = tmp_path / "sources.tgz"
    tarball.write_bytes(b"sources")
    key = f"{backends.runtime().key}-{backends._tarball_sources(tarball).key}"
    built = fake_build(cache, key)
    monkeypatch.setenv("PATH", "")  # nothing could be compiled
    assert backends.build(tarball) == built
    assert f"cached: {built} (built earlier in 12 s)" in capsys.readouterr().out
    tarball.write_bytes(b"other sources")  # another key: a build, which needs the tools
    with pytest.raises(PackagerError, match=re.escape(APT_LINE)) as failure:
        backends.build(tarball)
    assert "onnxruntime backend needs cmake, g++, make, patchelf" in str(failure.value)


def test_missing_sources_are_one_line(cache, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(capsys, "triton-backends", "--sources", str(tmp_path / "missing.tgz"))
    assert code == 1 and "missing.tgz do not exist" in one_error_line(err)

    fake_git = tmp_path / "bin" / "git"  # git without network, as here
    fake_git.parent.mkdir()
    fake_git.write_text("#!/bin/sh\necho \"fatal: unable to access: Could not resolve host: github.com\" >&2\n"
                        "exit 128\n")
    fake_git.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_git.parent}{os.pathsep}{os.environ['PATH']}")
    code, _, err = run_cli(capsys, "triton-backends")
    line = one_error_line(err)
    assert code == 1 and "TRITON_SRC is not set" in line and "needs network (fatal: unable to access" in line


def test_the_header_is_the_newest_c_api_the_library_has(tmp_path):
    for api in (19, 29, 33):
        (tmp_path / f"ort-header-{api}").mkdir()
        (tmp_path / f"ort-header-{api}" / "onnxruntime_c_api.h").write_text(f"#define ORT_API_VERSION {api}\r\n")
    assert backends._header(tmp_path, "1.32.0") == tmp_path / "ort-header-29"
    assert backends._header(tmp_path, "1.19.2") == tmp_path / "ort-header-19"
    with pytest.raises(PackagerError, match="no ONNX Runtime C header for API <= 18"):
        backends._header(tmp_path, "1.18.0")


def test_a_real_build_from_the_sources_then_cached(cache):
    """Cold into an empty cache, from TRITON_SRC (CI names the shared tarball); then the same inputs are cached."""
    sources = os.environ.get("TRITON_SRC")
    if not sources:
        message = "TRITON_SRC names no Triton sources tarball"
        if os.environ.get(REQUIRE_NATIVE) == "1":
            pytest.fail(f"{message} ({REQUIRE_NATIVE}=1 requires the native backend)")
        pytest.skip(message)
    built = backends.build(Path(sources))
    assert built == backends.find() and built.parent.parent == cache
    runtime = backends.runtime()
    dynamic = subprocess.run(["readelf", "-d", str(built / backends.BACKEND_LIBRARY)], capture_output=True,
                             text=True, check=True).stdout
    assert f"[{runtime.server_library}]" in dynamic and "[libtritonserver.so]" not in dynamic
    assert "[libonnxruntime.so.1]" in dynamic and "[${ORIGIN}]" in dynamic
    assert (built / "libonnxruntime.so.1").resolve().read_bytes() == runtime.ort_library.read_bytes()
    started = time.monotonic()
    assert backends.build(Path(sources)) == built
    assert time.monotonic() - started < 5
