"""What every benchmark does with its results: write them as JSON (creating the folder), and format table cells."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | None, results: dict) -> None:
    """Write ``results`` to ``path`` (nothing when ``path`` is empty)."""
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


def fmt(x, spec: str = ".2f") -> str:
    """A table cell: ``x`` formatted with ``spec``, or "-" for None (a value that was not measured)."""
    return "-" if x is None else format(x, spec)
