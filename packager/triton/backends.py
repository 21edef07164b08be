"""Triton's onnxruntime backend for the local launcher's server (the nvidia-pytriton wheel's tritonserver, which
ships only the python backend).

`build()` compiles the backend from Triton's r24.10 sources (a tarball, or `git clone` with network) against the
ONNX Runtime library of the installed onnxruntime package, so the server runs the ORT that gated the graph. The
result is cached outside the repository, in `$XDG_CACHE_HOME/triton-packager/backends/<key>/onnxruntime/`, where
the key hashes every input: the sources, the ORT library, the server library and this build's recipe. `find()` is
what the launcher asks: the built backend for the installed ORT library and server, or None.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from packager.console import keep_log, say
from packager.errors import PackagerError

BRANCH = "r24.10"  # the Triton release of the wheel's tritonserver 2.51.0
REPOSITORIES = ("onnxruntime_backend", "backend", "core", "common")
TRITON_GIT = "https://github.com/triton-inference-server/{}.git"
ORT_GIT = "https://github.com/microsoft/onnxruntime.git"  # its C header, at the tag of the installed version
ORT_HEADER_DIR = "include/onnxruntime/core/session"
RECIPE = 1  # bump when the build below changes what it makes: it is part of the cache key
BACKEND = "onnxruntime"
BACKEND_LIBRARY = "libtriton_onnxruntime.so"
RECORD = "build.json"
APT_PACKAGES = "cmake g++ make rapidjson-dev patchelf"
RAPIDJSON_HEADERS = (Path("/usr/include/rapidjson"), Path("/usr/local/include/rapidjson"))
# common r24.10 always adds its tests, which would fetch googletest: these targets stand in (nothing is compiled).
GOOGLETEST_STUB = """cmake_minimum_required(VERSION 3.17)
project(googletest-stub)
add_library(gtest INTERFACE)
add_library(gtest_main INTERFACE)
add_library(GTest::gtest ALIAS gtest)
add_library(GTest::gtest_main ALIAS gtest_main)
"""


@dataclass(frozen=True)
class Runtime:
    """What the built backend runs with: the installed ORT library and the wheel's server library."""

    ort_library: Path
    ort_version: str
    ort_sha256: str
    server: str  # "nvidia-pytriton <version>, <server library file>"
    server_library: str  # the auditwheel-renamed libtritonserver the backend must link

    @property
    def key(self) -> str:
        facts = [RECIPE, platform.machine(), self.ort_sha256, self.server]
        return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Sources:
    """Triton's sources: a tarball (its SHA-256) or the branch heads of the git repositories (their commits)."""

    tarball: Path | None
    identity: str

    @property
    def key(self) -> str:
        return hashlib.sha256(self.identity.encode()).hexdigest()[:12]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "triton-packager" / "backends"


def wheel_server_dir() -> Path:
    """The tritonserver folder of the nvidia-pytriton wheel (bin/, backends/, python_backend_stubs/)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise PackagerError("the local Triton launcher needs nvidia-pytriton: pip install '.[triton]'")
    return Path(spec.origin).parent / "tritonserver"


def runtime() -> Runtime:
    """The installed ORT library and server library, without importing either package."""
    ort = importlib.util.find_spec("onnxruntime")
    libraries = sorted((Path(ort.origin).parent / "capi").glob("libonnxruntime.so.*")) if ort and ort.origin else []
    if not libraries:
        raise PackagerError("the onnxruntime package has no capi/libonnxruntime.so.*: install the locked onnxruntime")
    server_libraries = sorted((wheel_server_dir().parents[1] / "nvidia_pytriton.libs").glob("libtritonserver*.so"))
    if not server_libraries:
        raise PackagerError("nvidia-pytriton has no nvidia_pytriton.libs/libtritonserver*.so: reinstall it")
    pytriton = importlib.metadata.version("nvidia-pytriton")
    library, server_library = libraries[-1], server_libraries[-1].name
    return Runtime(library, library.name.removeprefix("libonnxruntime.so."), _sha256(library),
                   f"nvidia-pytriton {pytriton}, {server_library}", server_library)


def find() -> Path | None:
    """The built onnxruntime backend folder for the installed ORT and server (the newest build), or None."""
    try:
        key = runtime().key
    except PackagerError:
        return None
    builds = [path / BACKEND for path in cache_root().glob(f"{key}-*") if (path / RECORD).exists()]
    return max(builds, key=lambda path: path.stat().st_mtime, default=None)


def build(tarball: Path | None = None) -> Path:
    """Build the backend (or find it cached) and return its folder: from `tarball` when given, else `git clone`."""
    run = runtime()
    sources = _tarball_sources(tarball) if tarball else _git_sources(run.ort_version)
    target = cache_root() / f"{run.key}-{sources.key}"
    say(f"ONNX Runtime {run.ort_version} ({run.ort_library}), {run.server}; sources: {sources.identity}")
    if (target / RECORD).exists():
        record = json.loads((target / RECORD).read_text())
        say(f"cached: {target / BACKEND} (built {record['created']} in {record['seconds']:.0f} s)")
        return target / BACKEND
    _require_tools()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))  # same filesystem: the rename is atomic
    try:
        started = time.monotonic()
        source = _unpack(sources, work / "src", run.ort_version)
        library = _compile(source, run, work)
        folder = work / "out" / BACKEND
        _install(library, run, folder)
        seconds = time.monotonic() - started
        record = {"created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "seconds": round(seconds, 1),
                  "branch": BRANCH, "sources": sources.identity, "recipe": RECIPE,
                  "runtime": {k: str(v) for k, v in asdict(run).items()}}
        (work / "out" / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        try:
            (work / "out").rename(target)
        except OSError:  # another build of the same inputs finished first
            if not (target / RECORD).exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"built in {seconds:.0f} s: {target / BACKEND}")
    return target / BACKEND


def _tarball_sources(tarball: Path) -> Sources:
    if not tarball.is_file():
        raise PackagerError(f"Triton sources {tarball} do not exist (TRITON_SRC names a .tgz of the {BRANCH} "
                            f"sources: {', '.join(REPOSITORIES)} and the ONNX Runtime C header)")
    return Sources(tarball.resolve(), f"{tarball.name} sha256 {_sha256(tarball)}")


def _git_sources(ort_version: str) -> Sources:
    """The commits `git clone` would get; without network this is where the build stops."""
    heads = [(TRITON_GIT.format(name), f"refs/heads/{BRANCH}") for name in REPOSITORIES]
    commits = []
    for url, ref in [*heads, (ORT_GIT, f"refs/tags/v{ort_version}")]:
        answer = _git("ls-remote", url, ref)
        if not answer.split():
            raise PackagerError(f"{url} has no {ref}")
        commits.append(f"{url.rsplit('/', 1)[-1].removesuffix('.git')}@{answer.split()[0][:12]}")
    return Sources(None, "git " + " ".join(commits))


def _git(*args: str) -> str:
    hint = (f"set TRITON_SRC to a tarball of the {BRANCH} sources (make triton-backends TRITON_SRC=…), or run "
            "where git can reach github.com")
    if shutil.which("git") is None:
        raise PackagerError(f"no Triton sources: TRITON_SRC is not set and git is not installed: {hint}")
    done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise PackagerError(f"no Triton sources: TRITON_SRC is not set and `git {args[0]}` needs network ({why}): "
                            f"{hint}")
    return done.stdout


def _require_tools() -> None:
    missing = [tool for tool in ("cmake", "g++", "make", "patchelf") if shutil.which(tool) is None]
    if not any(folder.is_dir() for folder in RAPIDJSON_HEADERS):
        missing.append("rapidjson-dev")
    if missing:
        raise PackagerError(f"building Triton's onnxruntime backend needs {', '.join(missing)}: "
                            f"apt-get install {APT_PACKAGES}")


def _unpack(sources: Sources, folder: Path, ort_version: str) -> Path:
    """The four source trees and `ort-header*/` folders with the ORT C header, in `folder`."""
    folder.mkdir(parents=True)
    if sources.tarball is not None:
        with tarfile.open(sources.tarball) as archive:
            archive.extractall(folder, filter="data")
    else:
        for name in REPOSITORIES:
            _git("clone", "-q", "--depth", "1", "-b", BRANCH, TRITON_GIT.format(name), str(folder / name))
        ort = folder / "onnxruntime"
        _git("clone", "-q", "--depth", "1", "--filter=blob:none", "--sparse", "-b", f"v{ort_version}", ORT_GIT,
             str(ort))
        _git("-C", str(ort), "sparse-checkout", "set", ORT_HEADER_DIR)
        shutil.copytree(ort / ORT_HEADER_DIR, folder / "ort-header-git")
    missing = [name for name in REPOSITORIES if not (folder / name / "CMakeLists.txt").exists()]
    if missing:
        raise PackagerError(f"the Triton sources lack {', '.join(missing)} at their top ({sources.identity})")
    return folder


def _header(source: Path, ort_version: str) -> Path:
    """The folder of the newest ORT C header whose API the library has (ORT_API_VERSION <= its minor version)."""
    library_api = int(ort_version.split(".")[1])
    apis = {}
    for header in source.glob("ort-header*/onnxruntime_c_api.h"):
        found = re.search(r"#define ORT_API_VERSION (\d+)", header.read_text(errors="replace"))
        if found and int(found.group(1)) <= library_api:
            apis[int(found.group(1))] = header.parent
    if not apis:
        raise PackagerError(f"the Triton sources hold no ONNX Runtime C header for API <= {library_api} "
                            f"(ONNX Runtime {ort_version})")
    return apis[max(apis)]


def _compile(source: Path, run: Runtime, work: Path) -> Path:
    """Configure and build the backend target only; returns the built library."""
    libs = work / "ort-lib"
    libs.mkdir()
    shutil.copy2(run.ort_library, libs / run.ort_library.name)
    for alias in ("libonnxruntime.so.1", "libonnxruntime.so"):
        (libs / alias).symlink_to(run.ort_library.name)
    stub = work / "googletest-stub"
    stub.mkdir()
    (stub / "CMakeLists.txt").write_text(GOOGLETEST_STUB)
    build_dir = work / "build"
    tags = [f"-DTRITON_{repo}_REPO_TAG={BRANCH}" for repo in ("BACKEND", "CORE", "COMMON")]
    fetched = [f"-DFETCHCONTENT_SOURCE_DIR_REPO-{repo.upper()}={source / repo}"
               for repo in ("common", "core", "backend")]
    configure = [
        "cmake", "-S", str(source / "onnxruntime_backend"), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
        "-DTRITON_ENABLE_GPU=OFF", "-DTRITON_ENABLE_ONNXRUNTIME_TENSORRT=OFF",
        "-DTRITON_ENABLE_ONNXRUNTIME_OPENVINO=OFF",
        f"-DTRITON_ONNXRUNTIME_INCLUDE_PATHS={_header(source, run.ort_version)}",
        f"-DTRITON_ONNXRUNTIME_LIB_PATHS={libs}", *tags, "-DFETCHCONTENT_FULLY_DISCONNECTED=ON", *fetched,
        f"-DFETCHCONTENT_SOURCE_DIR_GOOGLETEST={stub}",
    ]
    compile_ = ["cmake", "--build", str(build_dir), f"-j{os.cpu_count() or 1}", "--target",
                "triton-onnxruntime-backend"]
    log = work / "build.log"
    for step, command in (("configure", configure), ("compile", compile_)):
        say(f"  {step}: {' '.join(command[:2])} … (log: {log})")
        with log.open("a") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise PackagerError(f"building Triton's onnxruntime backend failed at {step}: {_first_error(log)} "
                                f"(build log: {keep_log('onnxruntime-backend-build', source=log)})")
    return build_dir / BACKEND_LIBRARY


def _install(library: Path, run: Runtime, folder: Path) -> None:
    """The backend beside its ORT library; it links the wheel's renamed server library, not libtritonserver.so."""
    folder.mkdir(parents=True)
    shutil.copy2(library, folder / BACKEND_LIBRARY)
    subprocess.run(["patchelf", "--replace-needed", "libtritonserver.so", run.server_library,
                    str(folder / BACKEND_LIBRARY)], check=True, capture_output=True)
    shutil.copy2(run.ort_library, folder / run.ort_library.name)
    (folder / "libonnxruntime.so.1").symlink_to(run.ort_library.name)


def _first_error(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines()
    errors = [line for line in lines if re.search(r"\berror\b|CMake Error", line, re.IGNORECASE)]
    return " ".join((errors or lines[-1:] or ["no output"])[0].split())[:300]


@lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    """The file's SHA-256, computed once per (path, size, mtime)."""
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
