"""Training and catalog data: conversations (with images) from the sources users have.

``--data`` accepts a folder of images (a same-stem ``.txt`` beside an image is its caption or
prompt), a ``.jsonl`` of LLaVA-format conversations (``{"image": path, "conversations": [{"from":
"human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}``), a plain text file or a
folder of them (one document per non-empty line), ``wordnet:<dir>`` (WordNet's glosses, e.g.
Debian's ``wordnet-base`` in /usr/share/wordnet) and ``hf:<dataset>[:split]`` (needs ``datasets``
and a reachable hub).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sae_weights.jsonl import json_objects

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


@dataclass
class Example:
    messages: list[dict]
    images: list[str] = field(default_factory=list)  # paths, in placeholder order


def _user(text: str, images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def _llava(row: dict, base: Path) -> Example:
    images = row.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    messages, placed = [], 0
    for turn in row.get("conversations", []):
        role = {"human": "user", "gpt": "assistant", "system": "system"}.get(turn.get("from"), "user")
        text = turn.get("value", "")
        n = text.count("<image>")
        text = text.replace("<image>\n", "").replace("<image>", "")
        parts = [{"type": "image"}] * n + [{"type": "text", "text": text}]
        placed += n
        messages.append({"role": role, "content": parts})
    if images and placed == 0 and messages:  # an image with no placeholder goes before the first turn
        messages[0]["content"] = [{"type": "image"}] * len(images) + messages[0]["content"]
    return Example(messages, [str((base / p).resolve()) for p in images])


def wordnet_glosses(root: Path) -> Iterator[str]:
    """``word, synonym: gloss; "example"`` for every synset in WordNet's data files."""
    for pos in ("noun", "verb", "adj", "adv"):
        path = Path(root) / f"data.{pos}"
        if not path.exists():
            continue
        with open(path, encoding="latin-1") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue  # licence header
                head, gloss = line.split("|", 1)
                fields = head.split()
                n_words = int(fields[3], 16)
                words = [fields[4 + 2 * i].replace("_", " ") for i in range(n_words)]
                words = [w.split("(")[0] for w in words]
                yield f"{', '.join(words)}: {gloss.strip()}"


def iter_examples(src: str) -> Iterator[Example]:
    if src.startswith("wordnet:"):
        # WordNet's data files are grouped by topic (acts, then animals, artifacts, ...), so the
        # first 250k tokens in file order are acts and animals only; a fixed-seed shuffle makes any
        # token budget a sample of the whole dictionary
        shuffled = list(wordnet_glosses(Path(src[len("wordnet:"):])))
        random.Random(0).shuffle(shuffled)
        # several glosses per conversation, so the chat template's fixed tokens are a small share
        glosses = iter(shuffled)
        while group := list(itertools.islice(glosses, 6)):
            yield Example([_user("\n".join(group))])
        return
    if src.startswith("hf:"):
        yield from _hub_dataset(src[3:])
        return
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"--data {src}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if images:
            for img in images:
                caption = img.with_suffix(".txt")
                text = caption.read_text().strip() if caption.exists() else "Describe the image."
                yield Example([_user(text, 1)], [str(img)])
            return
        for f in files:
            if f.suffix in (".txt", ".md"):
                yield from _text_file(f)
            elif f.suffix == ".jsonl":
                yield from _jsonl(f)
        return
    if path.suffix == ".jsonl":
        yield from _jsonl(path)
    else:
        yield from _text_file(path)


def _text_file(path: Path) -> Iterator[Example]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                yield Example([_user(line.strip())])


def _jsonl(path: Path) -> Iterator[Example]:
    with open(path) as f:
        for lineno, row in json_objects(f, path):
            if "conversations" in row:
                yield _llava(row, path.parent)
            elif "messages" in row:
                yield Example(row["messages"], row.get("images", []))
            elif "text" in row:
                yield Example([_user(row["text"])])
            else:
                raise ValueError(f"{path}:{lineno}: expected 'conversations', 'messages' or 'text'")


def _hub_dataset(spec: str) -> Iterator[Example]:
    try:
        import datasets
    except ImportError:
        raise RuntimeError("hf: data sources need the `datasets` package (pip install datasets)") from None
    name, _, split = spec.partition(":")
    ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    for row in ds:
        if "conversations" in row:
            yield _llava({k: v for k, v in row.items() if k != "image"}, Path("."))
        elif "text" in row:
            yield Example([_user(row["text"])])
