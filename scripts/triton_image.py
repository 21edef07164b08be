"""Build, or reuse, the local CPU Triton image that `--launcher docker --image TAG` serves from (`make triton-image`).

No registry image is needed. Two images, each tagged with a key derived from its inputs and built only when that
tag is missing:
- the base, `triton-packager/debian:bookworm-<key>`: Debian minbase from debootstrap, `docker import`ed (root);
- the server, `triton-packager/tritonserver:cpu-<key>` (docker/tritonserver-cpu.Dockerfile): Debian's Python 3.11,
  a venv with the lock's versions of what the python-backend models import, the nvidia-pytriton wheel's
  tritonserver with its python backend, and Triton's onnxruntime backend (`--ort-backend DIR`, default: the built one).
The server image is also tagged `triton-packager/tritonserver:cpu` (the latest built) and labelled with its backends,
which the docker launcher reads. Progress goes to stderr, the keyed tag to stdout. `--requirements` prints the
venv's requirements and builds nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from packager.triton.docker import BACKENDS_LABEL, LOCAL_IMAGE

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
CONTEXT_FILES = (ROOT / "docker" / "tritonserver-cpu.Dockerfile", ROOT / "docker" / "tritonserver")
MODEL_IMPORTS = ("numpy", "onnxruntime", "tokenizers")  # what packager/templates/python/*.py import
SERVER_PACKAGE = "nvidia-pytriton"
BASE_REPOSITORY = "triton-packager/debian"
IMAGE_REPOSITORY = LOCAL_IMAGE.split(":")[0]
SUITE = "bookworm"
BASE_RECIPE = 1  # part of the base's key: bump it when build_base changes
DEFAULT_MIRROR, DEFAULT_SECURITY = "http://deb.debian.org/debian", "http://deb.debian.org/debian-security"


class Failure(Exception):
    """One line for the user."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ort-backend", type=Path, help="a built onnxruntime backend directory to include "
                                                         "(default: the one `make triton-backends` built, if any)")
    parser.add_argument("--requirements", action="store_true", help="print the venv's requirements and stop")
    args = parser.parse_args(argv)
    try:
        if args.requirements:
            print(image_requirements(MODEL_IMPORTS), end="")
            return 0
        print(build(args.ort_backend or built_backend()))
        return 0
    except Failure as failure:
        print(f"error: {failure}", file=sys.stderr)
        return 1


def built_backend() -> Path | None:
    """The onnxruntime backend `make triton-backends` built for this venv's ONNX Runtime, when there is one."""
    from packager.triton import backends

    return backends.find()


def build(ort_backend: Path | None) -> str:
    """Reuse or build the base and the server image; return the server image's keyed tag."""
    require_docker()
    mirror, security = debian_mirrors()
    base = f"{BASE_REPOSITORY}:{SUITE}-{digest(json.dumps([SUITE, mirror, security, BASE_RECIPE]).encode())}"
    if not image_exists(base):
        timed(f"building {base} (debootstrap)", build_base, base, mirror, security)
    with tempfile.TemporaryDirectory(prefix="triton-image-") as folder:
        context = Path(folder)
        backends = write_context(context, ort_backend)
        tag = f"{IMAGE_REPOSITORY}:cpu-{context_key(context, base)}"
        if image_exists(tag):
            log(f"reusing {tag} (its inputs are unchanged)")
        else:
            timed(f"building {tag} (backends: {', '.join(backends)})", docker_build, context, tag, base, backends)
    run(["docker", "tag", tag, LOCAL_IMAGE])
    return tag


def require_docker() -> None:
    if shutil.which("docker") is None:
        raise Failure("no docker command: install Docker (CI, root: scripts/start_dockerd.sh installs docker.io)")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        raise Failure("no Docker daemon answers: start one (root: scripts/start_dockerd.sh)")


def write_context(context: Path, ort_backend: Path | None) -> list[str]:
    """The build context: the Dockerfile's files, the requirements, the CA bundle, the backends; their names."""
    for path in CONTEXT_FILES:
        shutil.copy2(path, context / path.name)
    (context / "requirements.txt").write_text(image_requirements(MODEL_IMPORTS))
    (context / "pytriton.txt").write_text(lock_blocks()[SERVER_PACKAGE][0])
    shutil.copyfile(ca_bundle(), context / "host-ca.crt")
    backends = context / "backends"
    backends.mkdir()
    if ort_backend is None:
        return ["python"]
    source = ort_backend / "onnxruntime" if (ort_backend / "onnxruntime").is_dir() else ort_backend
    if not (source / "libtriton_onnxruntime.so").is_file():
        raise Failure(f"{ort_backend}: no libtriton_onnxruntime.so (here or in onnxruntime/): not a built backend")
    shutil.copytree(source, backends / "onnxruntime", symlinks=True)
    return ["python", "onnxruntime"]


def context_key(context: Path, base: str) -> str:
    """A key of what the image is built from: the base's tag and every file of the context (names, contents)."""
    inputs = [base]
    for path in sorted(context.rglob("*")):
        if path.name == "host-ca.crt":  # how pip reaches the index: nothing of it stays in the image
            continue
        if path.is_symlink():
            content = f"-> {os.readlink(path)}"
        else:
            content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
        inputs.append(f"{path.relative_to(context)} {content}")
    return digest("\n".join(inputs).encode())


def lock_blocks() -> dict[str, tuple[str, set[str]]]:
    """The lock's entries: normalised name -> (its requirement lines with hashes, the names it is required by)."""
    blocks: dict[str, tuple[str, set[str]]] = {}
    for chunk in re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text()):
        match = re.match(r"([A-Za-z0-9._-]+)==", chunk)
        if not match:
            continue
        requirement, _, via = chunk.partition("# via")
        via = via.split("\n\n")[0]  # a blank line ends the entry (the lock's closing comments follow one)
        parents = {normalise(name) for name in re.findall(r"^[#\s]*([A-Za-z0-9._-]+)\s*$", via, re.M)}
        blocks[normalise(match[1])] = (requirement.rstrip() + "\n", parents)
    return blocks


def image_requirements(roots: tuple[str, ...]) -> str:
    """The lock's entries for `roots` and everything they require (the lock's `# via` lines, followed down)."""
    blocks = lock_blocks()
    chosen = {normalise(name) for name in roots}
    missing = chosen - set(blocks)
    if missing:
        raise Failure(f"{LOCK.name} has no {', '.join(sorted(missing))}")
    grew = True
    while grew:
        grown = chosen | {name for name, (_, parents) in blocks.items() if parents & chosen}
        grew, chosen = grown != chosen, grown
    return "".join(blocks[name][0] for name in sorted(chosen))


def build_base(tag: str, mirror: str, security: str) -> None:
    """Debian minbase by debootstrap, without apt's caches, imported as `tag`."""
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        raise Failure(f"building {tag} needs debootstrap and root (CI: scripts/start_dockerd.sh installs it)")
    with tempfile.TemporaryDirectory(prefix="triton-rootfs-", dir="/var/tmp") as folder:
        rootfs = Path(folder)
        run(["debootstrap", "--variant=minbase", SUITE, str(rootfs), mirror], quiet=True)
        (rootfs / "etc/apt/sources.list").write_text(
            f"deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\ndeb {security} {SUITE}-security main\n"
        )
        for leftover in [*(rootfs / "var/cache/apt/archives").glob("*.deb"), *(rootfs / "var/lib/apt/lists").glob("*")]:
            if leftover.is_file():
                leftover.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run(["docker", "import", "-c", "ENV LANG=C.UTF-8", "-", tag], stdin=tar.stdout, quiet=True)
        if tar.wait() != 0:
            raise Failure(f"tar of the {tag} root file system failed")


def docker_build(context: Path, tag: str, base: str, backends: list[str]) -> None:
    run([
        "docker", "build", "--network=host", "--tag", tag, "--file", str(context / CONTEXT_FILES[0].name),
        "--build-arg", f"BASE={base}", "--build-arg", f"PIP_INDEX_URL={pip_index()}",
        "--label", f"{BACKENDS_LABEL}={','.join(backends)}", str(context),
    ], quiet=True)  # fmt: skip


def debian_mirrors() -> tuple[str, str]:
    """The Debian mirror ($DEBIAN_MIRROR, else the host's apt sources, one-line or deb822, else deb.debian.org)
    and security mirror (the host's, else deb.debian.org)."""
    mirror, security = os.environ.get("DEBIAN_MIRROR"), None
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        text = path.read_text(errors="replace") if path.is_file() else ""
        for uri in re.findall(r"^(?:deb\s+(?:\[[^]]*\]\s+)?|URIs:\s*)(\S+)", text, re.M):
            if "security" in uri:
                security = security or uri
            else:
                mirror = mirror or uri
    return (mirror or DEFAULT_MIRROR).rstrip("/"), (security or DEFAULT_SECURITY).rstrip("/")


def pip_index() -> str:
    """The package index pip uses here ($PIP_INDEX_URL, then pip's configuration), else PyPI."""
    return os.environ.get("PIP_INDEX_URL") or pip_setting("index-url") or "https://pypi.org/simple"


def ca_bundle() -> Path:
    """The CA bundle pip trusts here: pip inside the build must trust the same (e.g. an intercepting proxy)."""
    for candidate in (os.environ.get("PIP_CERT"), pip_setting("cert"), ssl.get_default_verify_paths().openssl_cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise Failure("no CA bundle found for pip inside the build: set PIP_CERT to one")


def pip_setting(key: str) -> str | None:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    for line in listed.stdout.splitlines():
        name, _, value = line.partition("=")
        if name.rsplit(".", 1)[-1] == key:
            return value.strip().strip("'\"").split()[0]
    return None


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def run(command: list[str], stdin=None, quiet: bool = False) -> None:
    """Run `command`; its output goes to stderr (only on failure when `quiet`)."""
    done = subprocess.run(command, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not quiet or done.returncode != 0:
        sys.stderr.write(done.stdout)
    if done.returncode != 0:
        raise Failure(f"{' '.join(command[:2])} failed with exit code {done.returncode} (its output is above)")


def timed(what: str, step, *args) -> None:
    log(f"{what} ...")
    started = time.monotonic()
    step(*args)
    log(f"{what}: done in {time.monotonic() - started:.0f} s")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
