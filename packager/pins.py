"""Which versions a config pins, and the order of config writes that switches a repository's pins without a polling
server ever seeing an ensemble that points at an unloaded step.

A switch to the configs `targets` (model -> config text, None: remove the model's config) is three phases:
  1. every step lists its current pins and its target's (e.g. [N, N+1]), with its target config;
  2. every ensemble is written as its target (pinning N+1 and its steps' N+1);
  3. every step keeps only its target's pins, plus any version another ensemble of the repository still pins.
Each write replaces one config whole; a write that changes nothing is left out. Publish, rollback and the recovery of
a killed publish all run this one plan, on a local folder or in a bucket.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from packager.errors import PackagerError, first_line

CONFIG_FILE = "config.pbtxt"
POLICY = re.compile(r"version_policy:\s*\{\s*specific:\s*\{\s*versions:\s*\[[^\]]*\]\s*\}\s*\}")


@dataclass(frozen=True)
class ConfigWrite:
    model: str
    text: str | None  # None: delete the config (a model the switch removes)
    phase: int  # 1 steps list both, 2 ensembles switch, 3 steps keep the target's pins


def parse(text: str, where: str = "config") -> model_config_pb2.ModelConfig:
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise PackagerError(f"{where} does not parse as a Triton config: {first_line(exc)}") from None


def pinned(text: str) -> frozenset[int]:
    """The versions a config's specific version policy lists (empty: no specific policy)."""
    return frozenset(parse(text).version_policy.specific.versions)


def is_ensemble(text: str) -> bool:
    return parse(text).platform == "ensemble"


def step_pins(text: str) -> dict[str, int]:
    """An ensemble's steps and the version each pins (steps on 'latest', -1, are left out)."""
    return {step.model_name: step.model_version for step in parse(text).ensemble_scheduling.step
            if step.model_version > 0}


def repin(text: str, versions: frozenset[int] | set[int]) -> str:
    """`text` with its version policy listing exactly `versions` (the rest of the text unchanged)."""
    listed = ", ".join(str(v) for v in sorted(versions))
    changed, count = POLICY.subn(f"version_policy: {{ specific: {{ versions: [ {listed} ] }} }}", text)
    if count != 1 or pinned(changed) != frozenset(versions):
        raise PackagerError(f"cannot repin a config without exactly one specific version policy ({count} found)")
    return changed


def plan(current: Mapping[str, str | None], targets: Mapping[str, str | None],
         kept: Mapping[str, frozenset[int]]) -> list[ConfigWrite]:
    """The writes that switch the models of `targets` from `current` (None: no config yet); `kept` are the versions
    of each step that ensembles outside `targets` pin."""
    kinds = {name: target if target is not None else current.get(name) for name, target in targets.items()}
    ensembles = [name for name, text in kinds.items() if text is not None and is_ensemble(text)]
    steps = [name for name, text in kinds.items() if text is not None and name not in ensembles]
    writes = []
    for name in steps:
        target, now = targets[name], current.get(name)
        if target is not None:
            writes.append(ConfigWrite(name, repin(target, pinned(target) | (pinned(now) if now else set())), 1))
    writes += [ConfigWrite(name, targets[name], 2) for name in ensembles]
    for name in steps:
        target = targets[name]
        writes.append(ConfigWrite(name, repin(target, pinned(target) | kept.get(name, frozenset()))
                                  if target is not None else None, 3))
    latest, needed = dict(current), []
    for write in writes:
        if latest.get(write.model) != write.text:
            needed.append(write)
            latest[write.model] = write.text
    return needed


def kept_by(configs: Mapping[str, str]) -> dict[str, frozenset[int]]:
    """The versions of each step that the ensembles among `configs` pin."""
    kept: dict[str, set[int]] = {}
    for text in configs.values():
        if is_ensemble(text):
            for step, version in step_pins(text).items():
                kept.setdefault(step, set()).add(version)
    return {step: frozenset(versions) for step, versions in kept.items()}
