"""Offline judgements of one completion: does a concept show, is the text degenerate, how fluent
is it. Fixed on 2026-11-30 before any steering was tuned; an LLM judge (judge.py) can stand
beside them."""

from __future__ import annotations

import re
from collections import Counter

_WORDS = re.compile(r"[a-z]+")
_RUN = re.compile(r"(\s)\1{3,}|\u00a0{2,}")


def words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


def shows(text: str, concept_words: list[str]) -> bool:
    """One of the concept's words appears as a whole word."""
    return bool(set(words(text)) & {w.lower() for w in concept_words})


def degenerate(text: str) -> bool:
    """Text that has fallen apart: a run of blank characters (four spaces, two non-breaking
    spaces), the same word three times in a row ("and and and"), a three-word phrase three times
    ("the earth, the earth, the earth"), or, over eight words or more, fewer than half distinct."""
    if _RUN.search(text):
        return True
    w = words(text)
    if any(w[i] == w[i + 1] == w[i + 2] for i in range(len(w) - 2)):
        return True
    trigrams = Counter(zip(w, w[1:], w[2:], strict=False))
    if trigrams and max(trigrams.values()) >= 3:
        return True
    return len(w) >= 8 and len(set(w)) / len(w) < 0.5
