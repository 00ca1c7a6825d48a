"""JSON Lines as the project reads them: one object per non-empty line, errors naming file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator


def json_objects(lines: Iterable[str], where, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-empty line; ``error`` names ``where`` and the line when
    a line is not JSON or not an object."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise error(f"{where}:{lineno}: expected an object")
        yield lineno, row
