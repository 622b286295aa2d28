"""Preset files: configs/<experiment>/<name>.yaml, shipped inside the package (ntkrun/configs links
to the top-level configs/ folder). Imports nothing of ntkrun."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path


def presets_root() -> Path:
    return Path(str(resources.files("ntkrun"))) / "configs"


def presets_of(experiment: str) -> dict[str, Path]:
    """{preset name: path} of an experiment's preset files (configs/<experiment>/*.yaml)."""
    folder = presets_root() / experiment
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def preset_description(path: Path) -> str:
    """The first sentence of a preset file's opening comment (which may span several lines)."""
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("#")), len(lines))
    block = []
    for line in lines[start:]:
        if not line.startswith("#") or not line.lstrip("# ").strip():
            break
        block.append(line.lstrip("# ").strip())
    text = " ".join(block)
    end = re.search(r"(?<!\.)\.(?=\s|$)", text)  # a sentence's full stop, not a range's "2..8"
    return text[: end.end()] if end else text
