"""The Triton model repository on disk: layout, model names, versions, and an atomic publish with manifests.

    <root>/<model>/config.pbtxt
    <root>/<model>/<version>/{model files, manifest.json}

A publish adds one version (the next after the highest of its models, or a pinned one) to every model it carries.
It runs under a lock (fcntl.flock), stages everything in a workspace next to the root on the same filesystem
(`<parent>/.<root name>.publish/`: a folder inside the root would look like a model to Triton), writes a journal of
the renames that move the staged folders and configs into place, then performs them in order: version folders
first (each appears in one rename, unpinned, so a server polling the repository never loads it half-written), then
the configs in the order of `pins.plan` (steps list [N, N+1], ensembles switch to N+1, steps drop N), each config
one rename. A publish that fails, or is killed (SIGKILL) half-way, is rolled back: at once on an exception, else by
the next publish (or `recover`), which undoes the journal's renames in reverse (the same switch, backwards) and
leaves the repository exactly as it was.

Every version folder keeps the config it was published with (`<model>/<v>/config.pbtxt`, in its manifest), which
is what `fleet.rollback` switches back to. Identical files of one publish (the shipped graph in two models) are
stored once, as hard links.

Serving never changes a published version folder: the python backend's modules (model.py) are byte-compiled when
staged, into the __pycache__ file their import looks for, and listed in the manifest with every other file.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import py_compile
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from packager import pins
from packager.console import say
from packager.errors import PackagerError, UsageError, first_line
from packager.pins import CONFIG_FILE
from packager.record import MANIFEST_FILE, Gate, Manifest, Release, sha256

JOURNAL_FILE = "journal.json"
COMMITTED_FILE = "committed"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # Triton model names; no separators, no leading dot


class Publishable(Protocol):
    """What publish needs of a model (render.RenderedModel is one)."""

    name: str
    files: Mapping[str, Path | bytes]

    def config_text(self, version: int) -> str: ...


@dataclass(frozen=True)
class PublishResult:
    version: int
    paths: dict[str, Path]  # model name -> its new version folder


@dataclass(frozen=True)
class Move:
    """One rename of the journal. `backup` holds what `dst` was, when there was something."""

    kind: str  # "dir" or "file"
    src: str
    dst: str
    backup: str | None = None
    phase: int = 0  # of the pin switch (pins.ConfigWrite.phase); 0: a version folder


def check_name(name: str, what: str = "model name") -> str:
    """A valid Triton model name (or file name in a version folder) that cannot leave its folder."""
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(f"invalid {what} {name!r}: use letters, digits, '_', '.', '-', not starting with '.' or '-'")
    return name


def versions(model_dir: Path) -> list[int]:
    """The version folders of a model, as Triton reads them (decimal names without leading zeros)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and re.fullmatch(r"[1-9][0-9]*", p.name))


def publish(
    repo_root: Path | str,
    models: Sequence[Publishable],
    release: Release,
    gates: Mapping[str, Gate | None],
    version: int | None = None,
    force: bool = False,
    switch_wait_s: float = 0.0,
) -> PublishResult:
    """Add `version` (default: the next free one) of every model to the repository, atomically.

    `models` come in dependency order (steps before the ensembles that pin them), as render_repository returns
    them; each version folder gets a manifest of `release` with the model's gate (`gates`, by model name). An
    existing version is replaced only with `force`. `switch_wait_s` passes between the phases of the pin switch
    (what a server polling the repository needs to load one phase before the next).
    """
    root = Path(repo_root).absolute()
    check_models(models)
    workspace = _workspace(root)
    with locked(workspace, root):
        roll_back_interrupted(root, workspace)
        names = [m.name for m in models]
        chosen = choose_version({name: versions(root / name) for name in names}, version, force, str(root))
        transaction = Path(tempfile.mkdtemp(prefix="txn-", dir=workspace))
        try:
            try:
                moves = _stage(root, transaction, models, chosen, release, gates)
                _write_journal(transaction, moves)
            except OSError as exc:  # e.g. a full disk: nothing has moved yet
                raise PackagerError(f"cannot stage version {chosen} in {workspace}: {exc.strerror or exc}") from None
            for previous, move in zip([None, *moves], moves):
                if switch_wait_s and previous and previous.phase and move.phase != previous.phase:
                    time.sleep(switch_wait_s)  # polling servers load what the last phase made visible
                _apply(move)
            (transaction / COMMITTED_FILE).touch()
        except BaseException:
            _roll_back(transaction)
            raise
        finally:
            shutil.rmtree(transaction, ignore_errors=True)
    return PublishResult(chosen, {m.name: root / m.name / str(chosen) for m in models})


def recover(repo_root: Path | str) -> int:
    """Roll back publishes that were killed half-way and clear their staging; returns how many were rolled back."""
    root = Path(repo_root).absolute()
    workspace = root.parent / f".{root.name}.publish"
    if not workspace.is_dir():
        return 0
    with locked(workspace, root):
        return roll_back_interrupted(root, workspace)


# ---- staging -------------------------------------------------------------------------------------------------


def check_models(models: Sequence[Publishable]) -> None:
    if not models:
        raise UsageError("nothing to publish")
    names = [check_name(model.name) for model in models]
    if len(set(names)) != len(names):
        raise UsageError(f"model names repeat: {names}")
    for model in models:
        for relative in model.files:
            for part in relative.split("/"):
                check_name(part, f"file name in {model.name}")
            if relative in (MANIFEST_FILE, CONFIG_FILE):
                raise UsageError(f"{model.name}: {relative} is written by publish")


def _workspace(root: Path) -> Path:
    """The staging folder next to the root; renames from it into the root need one filesystem."""
    workspace = root.parent / f".{root.name}.publish"
    try:
        root.mkdir(parents=True, exist_ok=True)
        workspace.mkdir(exist_ok=True)
    except OSError as exc:
        raise PackagerError(f"cannot create {root} and its staging folder {workspace}: {exc.strerror}") from None
    if workspace.stat().st_dev != root.stat().st_dev:
        raise PackagerError(
            f"{root} is a mount point: publish stages in {root.parent}, which must be on its filesystem")
    return workspace


@contextmanager
def locked(workspace: Path, root: Path) -> Iterator[None]:
    """Hold the repository's publish lock (released by the kernel if the process dies)."""
    with (workspace / "lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"    waiting for another publish to {root} to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def choose_version(existing: Mapping[str, list[int]], version: int | None, force: bool, where: str) -> int:
    """The next version after every model's highest (`existing`: model -> its versions), or `version` when free."""
    if version is None:
        return max((v for found in existing.values() for v in found), default=0) + 1
    if version < 1:
        raise UsageError(f"version must be >= 1, got {version}")
    taken = [name for name, found in existing.items() if version in found]
    if taken and not force:
        raise UsageError(f"version {version} of {', '.join(taken)} exists in {where}; pass --force to replace it")
    return version


def _stage(root: Path, transaction: Path, models: Sequence[Publishable], version: int, release: Release,
           gates: Mapping[str, Gate | None]) -> list[Move]:
    """Write every model's version folder and configs under `transaction`; return the renames, in order."""
    names = tuple(model.name for model in models)
    targets = {model.name: model.config_text(version) for model in models}
    current = {name: _text(root / name / CONFIG_FILE) for name in names}
    others = {p.parent.name: p.read_text() for p in root.glob(f"*/{CONFIG_FILE}") if p.parent.name not in targets}
    folders, stored = [], Stored()
    for model in models:
        manifest = Manifest(model.name, names, version, gates.get(model.name), release, {})
        staged = transaction / "stage" / model.name
        write_version(staged / str(version), model, manifest, targets[model.name], stored)
        if (root / model.name).exists():
            replaced = root / model.name / str(version)
            backup = transaction / "replaced" / model.name if replaced.exists() else None
            folders.append(Move("dir", str(staged / str(version)), str(replaced), str(backup) if backup else None))
    configs = []
    for index, write in enumerate(pins.plan(current, targets, pins.kept_by(others))):
        target, staged = root / write.model, transaction / "stage" / write.model
        if not target.exists() and not any(move.dst == str(target) for move in configs):
            (staged / CONFIG_FILE).write_text(write.text)  # a new model appears in one rename, config and version
            configs.append(Move("dir", str(staged), str(target), phase=write.phase))
            continue
        source = transaction / "configs" / f"{index}-{write.model}"
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(write.text)
        backup = transaction / "old-configs" / f"{index}-{write.model}"
        configs.append(Move("file", str(source), str(target / CONFIG_FILE), str(backup), write.phase))
    for move in folders + configs:
        if move.backup:
            Path(move.backup).parent.mkdir(parents=True, exist_ok=True)
    return folders + configs


def _text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


@dataclass
class Stored:
    """The files one publish has written, by SHA-256: an identical file is linked to the first, not copied."""

    by_digest: dict[str, Path] = dataclasses.field(default_factory=dict)

    def write(self, path: Path, source: Path | bytes, model_name: str) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(source).hexdigest() if isinstance(source, bytes) else _digest(source, model_name)
        first = self.by_digest.get(digest)
        try:
            if first is not None:
                os.link(first, path)
            elif isinstance(source, bytes):
                path.write_bytes(source)
            else:
                shutil.copyfile(source, path)
        except OSError as exc:
            raise PackagerError(f"cannot copy {source if isinstance(source, Path) else 'data'} into {model_name}: "
                                f"{exc.strerror}") from None
        self.by_digest.setdefault(digest, path)
        return digest


def _digest(source: Path, model_name: str) -> str:
    try:
        return sha256(source)
    except OSError as exc:
        raise PackagerError(f"cannot copy {source} into {model_name}: {exc.strerror}") from None


def write_version(folder: Path, model: Publishable, manifest: Manifest, config: str, stored: Stored) -> dict[str, str]:
    """A complete version folder: the model's files, their byte-compiled modules, the config it is published with,
    and the manifest listing every file's SHA-256 (returned)."""
    folder.mkdir(parents=True)
    digests = {relative: stored.write(folder / relative, source, model.name)
               for relative, source in model.files.items()}
    digests[CONFIG_FILE] = stored.write(folder / CONFIG_FILE, config.encode(), model.name)
    for relative in [r for r in model.files if backend_module(r)]:
        compiled = _byte_compile(folder, relative, model.name)
        digests[compiled] = sha256(folder / compiled)
    dataclasses.replace(manifest, files=dict(sorted(digests.items()))).write(folder)
    return digests


def backend_module(relative: str) -> bool:
    """A module Triton's python backend imports: model.py, or another .py file at the top of the version folder."""
    return "/" not in relative and relative.endswith(".py")


def _byte_compile(folder: Path, relative: str, model_name: str) -> str:
    """Compile a module to the .pyc its import looks for, checked against the source's hash (not its mtime, which
    copies change): the server uses it instead of writing __pycache__ into the published version folder."""
    source = folder / relative
    compiled = Path(importlib.util.cache_from_source(str(source), optimization=""))
    try:
        py_compile.compile(
            str(source), cfile=str(compiled), dfile=relative, doraise=True, optimize=0,
            invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
        )  # fmt: skip
    except py_compile.PyCompileError as exc:
        raise PackagerError(f"{relative} of {model_name} does not compile: {first_line(exc.exc_value)}") from None
    return str(compiled.relative_to(folder))


def _write_journal(transaction: Path, moves: list[Move]) -> None:
    """The journal appears whole (rename) and on disk before the first move."""
    temporary = transaction / f"{JOURNAL_FILE}.tmp"
    with temporary.open("w") as handle:
        json.dump([dataclasses.asdict(move) for move in moves], handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, transaction / JOURNAL_FILE)


# ---- moves, roll-back, recovery --------------------------------------------------------------------------------


def _apply(move: Move) -> None:
    src, dst = Path(move.src), Path(move.dst)
    if move.backup and dst.exists():
        if move.kind == "dir":
            dst.rename(move.backup)  # a forced replacement: the old version steps aside
        else:
            os.link(dst, move.backup)  # the old config stays in place until the replace below
    os.replace(src, dst)


def _undo(move: Move) -> None:
    """Reverse one move, from whatever point it reached (each step is a rename, so the state is visible)."""
    src, dst = Path(move.src), Path(move.dst)
    backup = Path(move.backup) if move.backup else None
    if move.kind == "file":
        if backup is None and not src.exists():
            os.replace(dst, src)
        elif backup is not None and backup.exists() and not src.exists():
            os.replace(backup, dst)
        return
    if not src.exists():
        dst.rename(src)
    if backup is not None and backup.exists() and not dst.exists():
        backup.rename(dst)


def _roll_back(transaction: Path) -> bool:
    """Undo a transaction's moves unless it committed; True when there was something to undo."""
    journal = transaction / JOURNAL_FILE
    if (transaction / COMMITTED_FILE).exists() or not journal.exists():
        return False
    for data in reversed(json.loads(journal.read_text())):
        _undo(Move(**data))
    return True


def roll_back_interrupted(root: Path, workspace: Path) -> int:
    """Clear the transactions left in the workspace (their publishers died), rolling back uncommitted moves."""
    rolled_back = 0
    for transaction in sorted(p for p in workspace.iterdir() if p.is_dir() and p.name.startswith("txn-")):
        rolled_back += _roll_back(transaction)
        shutil.rmtree(transaction)
    if rolled_back:
        say(f"    rolled back {rolled_back} interrupted publish(es) to {root}")
    return rolled_back


# ---- small helpers ---------------------------------------------------------------------------------------------
