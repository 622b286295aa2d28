"""The spec reference: every key of every experiment with its type, default and meaning, read from
the spec models themselves (their fields, and the comment written beside each field), so the
documentation cannot drift from what `--check` accepts. The site's spec page is made from this."""

from __future__ import annotations

import inspect
import re
import types
import typing
from typing import Any

from pydantic import BaseModel

FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")
NOISE = re.compile(r"type:\s*ignore\[[^\]]*\]\s*#?\s*|fmt:\s*skip")


def _comments(model: type[BaseModel]) -> dict[str, str]:
    """field -> the comment beside its declaration (or on the lines just above it), for the model
    and its bases, the nearest class winning."""
    found: dict[str, str] = {}
    for cls in reversed([c for c in model.__mro__ if issubclass(c, BaseModel) and c is not BaseModel]):
        try:
            lines = inspect.getsource(cls).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines[1:]:
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("# ").strip())
                continue
            match = FIELD_LINE.match(line)
            if match and match.group(1) in cls.__annotations__:
                beside = NOISE.sub("", match.group(2) or "").strip()
                text = "; ".join(t for t in (" ".join(above), beside) if t)
                if text:
                    found[match.group(1)] = text
            above = []
    return found


def _nested(annotation: Any) -> type[BaseModel] | None:
    """The spec model a field holds (a sub-block of keys), if any."""
    return annotation if inspect.isclass(annotation) and issubclass(annotation, BaseModel) else None


def type_name(annotation: Any) -> str:
    """A field's type as a reader writes it in YAML: int > 0, list of int, one of a | b, ..."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        base, *meta = args
        bounds = []
        for m in meta:
            for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
                for item in getattr(m, "metadata", [m]):
                    value = getattr(item, attr, None)
                    if value is not None:
                        bounds.append(f"{sign} {value}")
        return type_name(base) + (f" {', '.join(dict.fromkeys(bounds))}" if bounds else "")
    if origin is typing.Literal:
        return "one of " + " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"map {type_name(args[0])} -> {type_name(args[1])}" if args else "map"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(block)"
    return "null" if value is None else repr(value).replace("'", "")


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, meaning) of every key of a spec model, blocks expanded."""
    out = []
    meanings = _comments(model)
    for name, field in model.model_fields.items():
        key = prefix + name
        sub = _nested(field.annotation)
        if sub is not None:
            out.extend(rows(sub, key + "."))
            continue
        meaning = meanings.get(name, "")
        kind = type_name(typing.Annotated[(field.annotation, *field.metadata)]) if field.metadata else None
        out.append((key, kind or type_name(field.annotation), _default(field), meaning))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def spec_reference(experiments: dict[str, type[BaseModel]]) -> str:
    """Markdown: one table per experiment of every key it accepts."""
    parts = []
    for name, model in experiments.items():
        parts.append(f"## `{name}`\n")
        if model.__doc__:
            parts.append(inspect.cleandoc(model.__doc__) + "\n")
        parts.append("| key | type | default | meaning |\n| --- | --- | --- | --- |")
        for key, kind, default, meaning in rows(model):
            parts.append(f"| `{key}` | {_cell(kind)} | `{_cell(default)}` | {_cell(meaning)} |")
        parts.append("")
    return "\n".join(parts)
