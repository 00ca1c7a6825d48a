"""Offline judgements of one completion: does a concept show, is the text degenerate, how fluent
is it. Fixed on 2026-11-30 before any steering was tuned; an LLM judge (judge.py) can stand
beside them."""

from __future__ import annotations

import re

_WORDS = re.compile(r"[a-z]+")
_RUN = re.compile(r"(\s)\1{3,}|\u00a0{2,}")


def words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


def shows(text: str, concept_words: list[str]) -> bool:
    """One of the concept's words appears as a whole word."""
    return bool(set(words(text)) & {w.lower() for w in concept_words})


def degenerate(text: str) -> bool:
    """Text that has fallen apart: a run of blank characters (four spaces, two non-breaking
    spaces); a loop, one to four words said three times in a row ("and and and", "the earth, the
    earth, the earth"); or, over eight words or more, fewer than half of them distinct."""
    if _RUN.search(text):
        return True
    w = words(text)
    for n in range(1, 5):
        for i in range(len(w) - 3 * n + 1):
            if w[i:i + n] == w[i + n:i + 2 * n] == w[i + 2 * n:i + 3 * n]:
                return True
    return len(w) >= 8 and len(set(w)) / len(w) < 0.5
