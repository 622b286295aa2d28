"""What makes two results the same (docs/architecture.md, "Run identity"): a run's Identity is the
hash of its spec (every key but those that change no result) and the content digest of each data
file it reads. Run directories record it (identity.json), unit files and checkpoints carry it, and
resume, shared run directories and `--unit` processes compare it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ntkrun.errors import UnitSpecMismatchError
from ntkrun.spec import RunSpec, legacy_spec_hash, spec_hash

IDENTITY = "identity.json"
MODEL_SOURCE = "model source "  # the key of a network.module's source file among the digests
RESULTS_VERSION = "results version "  # + the experiment: its runner record's results_version (1 if absent)


@dataclass(frozen=True)
class Identity:
    """What makes two results the same (docs/architecture.md, "Run identity"): the spec's hash
    (ntkrun.spec.spec_hash: every key but those that change no result) and the content digest of
    each data file the run reads (ntkrun.data.digests; none for generated inputs), of the source
    of a network.module (keyed "model source <path>": its file, or its package's files), and the
    runner's results version (keyed "results version <experiment>")."""

    spec_hash: str
    data: dict[str, str] = field(default_factory=dict)
    legacy: str | None = None  # the spec's hash by the rule before data.dir left it (old unit files)

    @classmethod
    def of(cls, spec: RunSpec) -> Identity:
        """The identity of a spec that reads no data files."""
        return cls(spec_hash(spec), legacy=legacy_spec_hash(spec))

    def tag(self) -> dict[str, Any]:
        return {"spec_hash": self.spec_hash, "data": dict(self.data)}

    def mismatch(self, tag: dict[str, Any]) -> str | None:
        """Why results tagged `tag` are not this identity's (None: they are). A tag without data
        digests (made before they existed) is judged by its spec hash alone."""
        theirs = tag.get("data")
        if theirs is None and self.legacy is not None and tag.get("spec_hash") == self.legacy:
            return None  # a unit file of an earlier version: its hash included data.dir
        if tag.get("spec_hash") != self.spec_hash:
            return f"belongs to spec {tag.get('spec_hash')}, not this run's {self.spec_hash}"
        if theirs is None:
            return None
        for name in sorted(set(theirs) | set(self.data)):
            if name.startswith(RESULTS_VERSION):  # tags made before versions existed: version 1
                old, new = theirs.get(name, "1"), self.data.get(name, "1")
                if old != new:
                    return (
                        f"was computed by results version {old} of ntkrun's "
                        f"{name.removeprefix(RESULTS_VERSION)} runner, this ntkrun's is {new} (an "
                        "upgrade changed its results: start a new run of the same spec)"
                    )
                continue
            if theirs.get(name) != self.data.get(name) and name.startswith(MODEL_SOURCE):
                file, was, now = name.removeprefix(MODEL_SOURCE), theirs.get(name), self.data.get(name)
                change = (
                    "the model did not import it then" if was is None
                    else "the model does not import it now" if now is None
                    else "the file was edited since"
                )  # fmt: skip
                what = f"{file} had digest {was}, now {now} ({change})"
                return f"was computed by another version of the model: {what}"
            if theirs.get(name) != self.data.get(name):
                return (
                    f"was computed on other data: {name} had digest {theirs.get(name)}, the data "
                    f"found now has {self.data.get(name)} (another dataset, or the files changed)"
                )
        return None


def read_tag(path: Path) -> dict[str, Any]:
    """The identity a run directory's identity.json records, as a tag; UnitSpecMismatchError (one
    line naming the file) if it is not a JSON object with a spec hash (edited, truncated)."""
    file = Path(path) / IDENTITY
    try:
        tag = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnitSpecMismatchError(f"{file}: unreadable ({err}); the run's identity is unknown") from None
    if not isinstance(tag, dict) or not isinstance(tag.get("spec_hash"), str):
        raise UnitSpecMismatchError(f"{file}: holds no spec_hash; the run's identity is unknown")
    if not isinstance(tag.get("data", {}), dict):
        raise UnitSpecMismatchError(f"{file}: its data digests are not a mapping")
    return tag


def run_mismatch(path: Path, identity: Identity) -> str | None:
    """Why the run in path is not of this identity: its identity.json, or for a run made before
    that file existed, the spec hash of its spec.yaml."""
    if (path / IDENTITY).is_file():
        tag = read_tag(path)
    else:
        theirs = yaml.safe_load((path / "spec.yaml").read_text())
        tag = {"spec_hash": spec_hash(theirs) if isinstance(theirs, dict) else None}
    return identity.mismatch(tag)


def recorded(path: Path, spec: RunSpec) -> Identity:
    """The identity a run directory records (for reading a run, e.g. its status), else the spec's."""
    if not (Path(path) / IDENTITY).is_file():
        return Identity.of(spec)
    tag = read_tag(path)
    return Identity(tag["spec_hash"], tag.get("data") or {}, legacy_spec_hash(spec))
