"""MkDocs hook: the spec reference page is generated from the spec models when the site is built
(ntkrun.specdoc), at its `<!-- spec-reference -->` marker."""

from __future__ import annotations

from typing import Any

MARKER = "<!-- spec-reference -->"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if MARKER not in markdown:
        return markdown
    from ntkrun.experiments import EXPERIMENTS
    from ntkrun.specdoc import spec_reference

    return markdown.replace(MARKER, spec_reference({name: e.model for name, e in EXPERIMENTS.items()}))
