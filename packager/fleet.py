"""Releases where a fleet of polling Triton servers reads: publish to object storage, roll back, prune, verify,
status. One store interface (storage.py) for a local folder and a bucket; one switch (pins.plan) for every change.

Publishing version N+1 to a bucket, under the store's lock:
  1. recover: a journal left by a killed publisher is rolled back (or, when its switch had finished, cleared);
  2. write the journal (the version, each model's config before, the configs to switch to);
  3. upload every model's N+1 folder while every config still pins N (Triton loads only pinned versions): each
     folder's python modules first (a python version folder is never visible without its model.py, which would
     leave a server LOADING forever), its manifest last;
  4. verify the upload: the listed objects of each folder are exactly the staged files, with their sizes;
  5. switch the pins (pins.plan): steps list [N, N+1], ensembles pin N+1, steps drop N; each config one PUT;
     between phases, wait until the servers named report the phase's versions ready, then the switch wait;
  6. delete the journal.
A publisher killed anywhere leaves every config pinning N or, during 5, a consistent mix of N and N+1; the next
publish, rollback or prune rolls the journal back: the same switch backwards, then the N+1 objects are deleted.
A local repository publishes through repository.publish (its folders appear in one rename), in the same order.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from packager import pins, repository
from packager.console import say, table
from packager.errors import PackagerError, UsageError
from packager.pins import CONFIG_FILE
from packager.record import MANIFEST_FILE, Gate, Manifest, Release, parse_json, to_data
from packager.storage import LocalStore, Store

JOURNAL_FILE = "journal.json"
SWITCH_WAIT_VARIABLE = "PACKAGER_SWITCH_WAIT_S"  # at least a polling fleet's poll interval plus a model's load
S3_SWITCH_WAIT_S = 10.0
READY_TIMEOUT_S = 300.0
UPLOAD_HOOK = "PACKAGER_TEST_UPLOAD_PAUSE"  # tests: "<seconds>" to sleep before each uploaded file
VERSION_KEY = re.compile(r"([^/]+)/([1-9][0-9]*)/(.+)")


@dataclass(frozen=True)
class Journal:
    """The publish state object: what a killed publish needs to be undone."""

    version: int
    fresh: tuple[str, ...]  # models whose version folder the publish creates (deleted on roll-back)
    previous: dict[str, str | None]  # model -> its config before the publish (None: the model is new)
    targets: dict[str, str]  # model -> the config the publish switches to

    def encode(self) -> bytes:
        return json.dumps(to_data(self), indent=2).encode()

    @classmethod
    def decode(cls, data: bytes) -> "Journal":
        value = json.loads(data)
        return cls(value["version"], tuple(value["fresh"]), value["previous"], value["targets"])


@dataclass(frozen=True)
class VersionFacts:
    """One version of one model, as status shows it."""

    model: str
    version: int
    pinned: bool
    manifest: Manifest | None


# ---- reading the store -------------------------------------------------------------------------------------------


def versions(store: Store, model: str) -> list[int]:
    """The version folders of a model (folders exist in a bucket only as the keys under them)."""
    return sorted({int(m.group(2)) for key in store.sizes(f"{model}/")
                   if (m := VERSION_KEY.fullmatch(key)) and m.group(1) == model})


def configs(store: Store) -> dict[str, str]:
    """Every model's config.pbtxt."""
    found = {}
    for name in store.models():
        data = store.read(f"{name}/{CONFIG_FILE}")
        if data is not None:
            found[name] = data.decode()
    return found


def manifest(store: Store, model: str, version: int) -> Manifest | None:
    data = store.read(f"{model}/{version}/{MANIFEST_FILE}")
    return parse_json(Manifest, data, f"{store.url}/{model}/{version}/{MANIFEST_FILE}") if data else None


def recipe_models(store: Store, recipe: str) -> list[str]:
    """The models `recipe` published to the store (by the manifest of each model's highest version)."""
    names = []
    for name in store.models():
        newest = max(versions(store, name), default=None)
        found = manifest(store, name, newest) if newest else None
        if found is not None and found.release.build.recipe == recipe:
            names.append(name)
    if not names:
        raise UsageError(f"no model of recipe '{recipe}' in {store.url}")
    return names


def protected(all_configs: Mapping[str, str]) -> dict[str, frozenset[int]]:
    """Every version a config of the repository pins (its own policy, or an ensemble's step)."""
    kept = {name: set(pins.pinned(text)) for name, text in all_configs.items()}
    for step, versions_ in pins.kept_by(all_configs).items():
        kept.setdefault(step, set()).update(versions_)
    return {name: frozenset(found) for name, found in kept.items()}


# ---- the switch --------------------------------------------------------------------------------------------------


def switch_wait(store: Store) -> float:
    """Seconds between the phases of a switch: PACKAGER_SWITCH_WAIT_S, else S3_SWITCH_WAIT_S for a bucket (a fleet
    polls it) and 0 for a local folder (servers in explicit mode load on request)."""
    value = os.environ.get(SWITCH_WAIT_VARIABLE)
    if not value:
        return 0.0 if isinstance(store, LocalStore) else S3_SWITCH_WAIT_S
    try:
        return float(value)
    except ValueError:
        raise UsageError(f"{SWITCH_WAIT_VARIABLE} must be a number of seconds, got {value!r}") from None


def switch(store: Store, targets: Mapping[str, str | None], wait_s: float | None = None,
           servers: Sequence[str] = ()) -> int:
    """Switch the configs of `targets` (pins.plan); between phases, wait until each of `servers` (HTTP host:port)
    reports every version the last phase pinned ready, then `wait_s` more, so that a fleet has loaded what one phase
    made visible before the next relies on it. Returns how many configs were written."""
    wait_s = switch_wait(store) if wait_s is None else wait_s
    current = configs(store)
    others = {name: text for name, text in current.items() if name not in targets}
    writes = pins.plan({name: current.get(name) for name in targets}, targets, pins.kept_by(others))
    for index, write in enumerate(writes):
        if index and write.phase != writes[index - 1].phase:
            _wait_ready(servers, [w for w in writes[:index] if w.phase == writes[index - 1].phase])
            time.sleep(wait_s)
        key = f"{write.model}/{CONFIG_FILE}"
        if write.text is None:
            store.delete([key])
        else:
            store.write(key, write.text.encode())
    return len(writes)


def _wait_ready(servers: Sequence[str], phase: Sequence[pins.ConfigWrite], timeout_s: float = READY_TIMEOUT_S) -> None:
    wanted = [(w.model, v) for w in phase if w.text is not None for v in sorted(pins.pinned(w.text))]
    for server in servers:
        deadline = time.monotonic() + timeout_s
        for model, version in wanted:
            url = f"http://{server.removeprefix('http://')}/v2/models/{model}/versions/{version}/ready"
            while not _answers_200(url):
                if time.monotonic() > deadline:
                    raise PackagerError(f"{server} did not report version {version} of {model} ready within "
                                        f"{timeout_s:.0f} s: the switch stopped half-way (rerun it, or roll back)")
                time.sleep(0.25)


def _answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status == 200
    except (OSError, ValueError):
        return False


def remove_version(store: Store, model: str, version: int) -> None:
    """Delete a version folder: locally in one rename; in a bucket its manifest first and python modules last, so
    the folder is never visible without its model.py."""
    if isinstance(store, LocalStore):
        store.remove_folder(f"{model}/{version}")
        return
    keys = list(store.sizes(f"{model}/{version}/"))
    folder = f"{model}/{version}/"
    store.delete(sorted(keys, key=lambda key: (not key.endswith(MANIFEST_FILE),
                                               repository.backend_module(key.removeprefix(folder)))))


def recover(store: Store) -> bool:
    """Undo (or, if its switch finished, clear) the publish a killed publisher left; True when there was one."""
    if isinstance(store, LocalStore):  # its journal of renames (the caller holds the lock)
        return repository.roll_back_interrupted(store.root, store.workspace) > 0
    data = store.read_state(JOURNAL_FILE)
    if data is None:
        return False
    journal = Journal.decode(data)
    current = configs(store)
    if all(current.get(name) == text for name, text in journal.targets.items()):
        say(f"    a killed publish of version {journal.version} to {store.url} had finished its switch: kept")
    else:
        switch(store, journal.previous)
        for name in journal.fresh:
            remove_version(store, name, journal.version)
        say(f"    rolled back a killed publish of version {journal.version} to {store.url}")
    store.clear_state(JOURNAL_FILE)
    return True


# ---- publish -----------------------------------------------------------------------------------------------------


def publish(store: Store, models: Sequence[repository.Publishable], release: Release,
            gates: Mapping[str, Gate | None], version: int | None = None, force: bool = False,
            switch_wait_s: float | None = None, servers: Sequence[str] = ()) -> int:
    """Publish `models` (steps before ensembles) as one new version of each to the store; returns the version.
    `switch_wait_s` passes between the switch's phases (default: switch_wait), after `servers` report the last
    phase's versions ready (a bucket only)."""
    wait_s = switch_wait(store) if switch_wait_s is None else switch_wait_s
    if isinstance(store, LocalStore):
        return repository.publish(store.root, models, release, gates, version=version, force=force,
                                  switch_wait_s=wait_s).version
    repository.check_models(models)
    names = [model.name for model in models]
    with store.lock():
        recover(store)
        listing = {name: versions(store, name) for name in names}
        chosen = repository.choose_version(listing, version, force, store.url)
        current = configs(store)
        serving = [name for name, found in protected(current).items() if name in names and chosen in found]
        if serving:
            raise UsageError(f"version {chosen} of {', '.join(serving)} is pinned in {store.url}: a served version is "
                             "never replaced; publish a new version or roll back first")
        targets = {model.name: model.config_text(chosen) for model in models}
        journal = Journal(chosen, tuple(name for name in names if chosen not in listing[name]),
                          {name: current.get(name) for name in names}, targets)
        store.write_state(JOURNAL_FILE, journal.encode())
        try:
            with tempfile.TemporaryDirectory(prefix="packager-upload-") as staging:
                uploaded = _upload(store, Path(staging), models, chosen, release, gates, targets)
            _verify_upload(store, chosen, uploaded)
            say(f"    uploaded and verified version {chosen} of {len(models)} models; switching the pins")
            written = switch(store, targets, wait_s, servers)
        except BaseException:
            recover(store)
            raise
        store.clear_state(JOURNAL_FILE)
    say(f"    {written} config writes switched {store.url} to version {chosen}")
    return chosen


def _upload(store: Store, staging: Path, models: Sequence[repository.Publishable], version: int, release: Release,
            gates: Mapping[str, Gate | None], targets: Mapping[str, str]) -> dict[str, int]:
    """Stage each version folder here (byte-compiled modules, manifest) and upload it; returns key -> size."""
    pause = float(os.environ.get(UPLOAD_HOOK, "0") or 0)
    names, stored, uploaded = tuple(m.name for m in models), repository.Stored(), {}
    for model in models:
        folder = staging / model.name
        record = Manifest(model.name, names, version, gates.get(model.name), release, {})
        repository.write_version(folder, model, record, targets[model.name], stored)
        files = [p for p in folder.rglob("*") if p.is_file()]
        relative = {path: path.relative_to(folder).as_posix() for path in files}
        for path in sorted(files, key=lambda p: (p.name == MANIFEST_FILE, not repository.backend_module(relative[p]),
                                                 str(p))):
            key = f"{model.name}/{version}/{relative[path]}"
            if pause:
                time.sleep(pause)
            store.upload(key, path)
            uploaded[key] = path.stat().st_size
    return uploaded


def _verify_upload(store: Store, version: int, uploaded: Mapping[str, int]) -> None:
    prefixes = sorted({key.split("/")[0] for key in uploaded})
    listed = {}
    for name in prefixes:
        listed.update(store.sizes(f"{name}/{version}/"))
    if listed != dict(uploaded):
        wrong = sorted(set(listed.items()) ^ set(uploaded.items()))
        raise PackagerError(f"the upload of version {version} to {store.url} does not list as written "
                            f"({len(wrong)} differences, e.g. {wrong[0][0]}): nothing was switched")


# ---- release operations --------------------------------------------------------------------------------------------


def serving_version(store: Store, names: Sequence[str]) -> int | None:
    """The version the recipe's ensembles pin (the highest pin of its models when it has none)."""
    current = {name: text for name, text in configs(store).items() if name in names}
    ensembles = [pins.pinned(text) for text in current.values() if pins.is_ensemble(text)]
    found = [v for pinned in (ensembles or [pins.pinned(text) for text in current.values()]) for v in pinned]
    return max(found, default=None)


def rollback(store: Store, recipe: str, to: int | None = None, switch_wait_s: float | None = None,
             servers: Sequence[str] = ()) -> int:
    """Switch the recipe's models back to version `to` (default: the newest complete one below the served one)."""
    with store.lock():
        recover(store)
        names = recipe_models(store, recipe)
        now = serving_version(store, names)
        available = {name: set(versions(store, name)) for name in names}
        if to is None:
            older = [v for v in set.union(*available.values()) if now is None or v < now]
            candidates = [v for v in sorted(older, reverse=True) if _restorable(store, available, v)]
            if not candidates:
                raise UsageError(f"no version of '{recipe}' older than {now} to roll back to in {store.url}")
            to = candidates[0]
        targets = {}
        for name in names:
            if to not in available[name]:
                continue
            config = store.read(f"{name}/{to}/{CONFIG_FILE}")
            if config is None:
                raise UsageError(f"version {to} of {name} has no stored config: it was published before rollback "
                                 "was possible; publish it again")
            _require_complete(store, name, to)
            targets[name] = config.decode()
        if not targets:
            raise UsageError(f"no model of '{recipe}' has version {to} in {store.url}")
        written = switch(store, targets, switch_wait_s, servers)
    say(f"    {written} config writes switched {', '.join(targets)} to version {to}")
    return to


def _restorable(store: Store, available: Mapping[str, set[int]], version: int) -> bool:
    """Every model that has `version` keeps the config it was published with."""
    return all(store.read(f"{name}/{version}/{CONFIG_FILE}") is not None for name, found in available.items()
               if version in found)


def _require_complete(store: Store, name: str, version: int) -> None:
    found = manifest(store, name, version)
    listed = {key.split("/", 2)[2] for key in store.sizes(f"{name}/{version}/")}
    if found is None or not set(found.files) <= listed:
        raise PackagerError(f"version {version} of {name} in {store.url} is incomplete: not switching to it")


def prune(store: Store, recipe: str, keep: int) -> dict[str, list[int]]:
    """Delete all but the `keep` newest versions of each of the recipe's models, never a pinned one."""
    if keep < 1:
        raise UsageError(f"--keep must be >= 1, got {keep}")
    removed: dict[str, list[int]] = {}
    with store.lock():
        recover(store)
        names = recipe_models(store, recipe)
        pinned = protected(configs(store))
        for name in names:
            found = versions(store, name)
            newest = set(found[-keep:])
            doomed = [v for v in found if v not in newest and v not in pinned.get(name, frozenset())]
            for version in doomed:
                remove_version(store, name, version)
            removed[name] = doomed
    return removed


@dataclass(frozen=True)
class Problem:
    model: str
    version: int
    file: str
    what: str  # "missing", "sha256 differs", "not in the manifest", "no manifest"


def verify(store: Store, recipe: str, version: int | None = None) -> tuple[int, list[Problem]]:
    """Hash every file of the recipe's pinned versions (or `version`) against its manifest; (files checked,
    problems)."""
    names = recipe_models(store, recipe)
    current = configs(store)
    checked, problems = 0, []
    for name in names:
        wanted = [version] if version is not None else sorted(pins.pinned(current[name]))
        present = versions(store, name)
        for number in wanted:
            if number not in present:
                if version is None:
                    problems.append(Problem(name, number, "-", "pinned but missing"))
                continue
            found = manifest(store, name, number)
            if found is None:
                problems.append(Problem(name, number, MANIFEST_FILE, "no manifest"))
                continue
            listed = {key.split("/", 2)[2] for key in store.sizes(f"{name}/{number}/")}
            for relative, digest in found.files.items():
                checked += 1
                if relative not in listed:
                    problems.append(Problem(name, number, relative, "missing"))
                elif store.sha256(f"{name}/{number}/{relative}") != digest:
                    problems.append(Problem(name, number, relative, "sha256 differs"))
            problems += [Problem(name, number, extra, "not in the manifest")
                         for extra in sorted(listed - set(found.files) - {MANIFEST_FILE})]
    if version is not None and checked == 0 and not problems:
        raise UsageError(f"no model of '{recipe}' has version {version} in {store.url}")
    return checked, problems


def status(store: Store, recipe: str) -> list[VersionFacts]:
    names = recipe_models(store, recipe)
    current = configs(store)
    pinned = protected(current)
    return [VersionFacts(name, number, number in pinned.get(name, frozenset()), manifest(store, name, number))
            for name in names for number in versions(store, name)]


def status_table(facts: Sequence[VersionFacts]) -> str:
    rows = []
    for fact in facts:
        found = fact.manifest
        rows.append([fact.model, fact.version, "pinned" if fact.pinned else "-",
                     found.release.created if found else "no manifest",
                     found.gate.name if found and found.gate else "-",
                     found.release.weights_sha256[:12] if found else "-",
                     len(found.files) if found else "-", found.release.source if found else "-"])
    return table(["model", "version", "served", "created", "gate", "weights", "files", "source"], rows)


@contextmanager
def served_copy(repository: Path | str, store: Store, names: Sequence[str]) -> Iterator[Path]:
    """A local folder holding `names` as the repository serves them: the folder itself, or for a bucket a temporary
    copy of their configs and pinned versions (the same bytes), removed on exit."""
    if isinstance(store, LocalStore):
        yield Path(repository)
        return
    with tempfile.TemporaryDirectory(prefix="packager-served-") as copy:
        download(store, names, Path(copy))
        yield Path(copy)


def download(store: Store, names: Sequence[str], folder: Path) -> None:
    """Copy the named models' configs and pinned version folders into a local repository `folder`."""
    current = configs(store)
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / CONFIG_FILE).write_text(current[name])
        for number in pins.pinned(current[name]):
            for key in store.sizes(f"{name}/{number}/"):
                path = folder / key
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(store.read(key) or b"")

