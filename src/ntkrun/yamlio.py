"""Reading the YAML of specs and presets: floats as a user means them (1e-3), a key given twice
refused, and every problem one line naming the file (SpecError)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ntkrun.errors import SpecError


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3 and 1E6 as floats (YAML 1.2), as a user means them, and
    refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable keys are refused by the base class
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """YAML text -> its data, as `_Loader` reads it."""
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; any problem becomes a one-line SpecError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise SpecError(f"{path}: cannot read: {reason}") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or "malformed YAML"
        raise SpecError(f"{path}: {where}{problem}") from None
    if data is None:
        raise SpecError(f"{path}: empty file, expected a YAML mapping of spec keys")
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a YAML mapping of spec keys, got {type(data).__name__}")
    return data
