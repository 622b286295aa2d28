"""Preset files: configs/<experiment>/<name>.yaml, shipped inside the package (ntkrun/configs links
to the top-level configs/ folder). Imports nothing of ntkrun."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def presets_root() -> Path:
    return Path(str(resources.files("ntkrun"))) / "configs"


def presets_of(experiment: str) -> dict[str, Path]:
    """{preset name: path} of an experiment's preset files (configs/<experiment>/*.yaml)."""
    folder = presets_root() / experiment
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def preset_description(path: Path) -> str:
    """The first comment line of a preset file."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
