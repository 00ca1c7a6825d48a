"""Feature catalog: text explanations (and any other per-feature facts) keyed by feature id.

Reads the paper's release format, a JSON list of ``{"model.layers.24_feature<i>": "<text>"}``
objects (one dict holding many such keys is accepted too), and JSONL rows
``{"feature": i, "explanation": "...", ...}`` whose other keys are kept as the entry's extras.

Search is lexical (BM25 over lower-cased word tokens of the explanation and, for automatic
catalogs, of each feature's top-activating contexts). ``FeatureCatalog.search`` takes any
``scorer`` with the ``Scorer`` signature, so an embedding model can replace BM25 without touching
callers: embed the explanations once, embed the query, return cosine similarities.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .jsonl import json_objects

_PAPER_KEY = re.compile(r"^(?P<hook>.+)_feature(?P<id>\d+)$")
_WORD = re.compile(r"[a-z0-9]+")
_MARKED = re.compile(r"«([^»]*)»")

Scorer = Callable[[str, list["FeatureEntry"]], list[float]]


class CatalogError(ValueError):
    """A catalog file that cannot be read; the message names the file and the line."""


@dataclass
class FeatureEntry:
    feature: int
    explanation: str = ""
    hookpoint: str | None = None
    extras: dict = field(default_factory=dict)

    @property
    def search_text(self) -> str:
        """What search matches: the explanation and, from automatic catalogs, the top contexts,
        where the marked activating tokens (``«dog»``) count three times: a feature that fires *on*
        a word should outrank one that merely fires near it."""
        contexts = self.extras.get("top_contexts") or []
        texts = [c.get("text", "") if isinstance(c, dict) else str(c) for c in contexts]
        marked = [m for t in texts for m in _MARKED.findall(t)]
        plain = " ".join(texts).replace("«", " ").replace("»", " ")
        return " ".join([self.explanation, plain, *(marked * 3)])

    def to_dict(self) -> dict:
        out = {"feature": self.feature, "explanation": self.explanation, **self.extras}
        if self.hookpoint:
            out["hookpoint"] = self.hookpoint
        return out


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class FeatureCatalog:
    def __init__(self, entries: Iterable[FeatureEntry] = ()) -> None:
        self._by_id: dict[int, FeatureEntry] = {}
        for e in entries:
            self.add(e)
        self._index: tuple[list[FeatureEntry], list[Counter], Counter, float] | None = None

    def add(self, entry: FeatureEntry) -> None:
        prev = self._by_id.get(entry.feature)
        if prev is not None:  # a later source adds to an earlier one (e.g. explanations beside stats)
            prev.explanation = entry.explanation or prev.explanation
            prev.extras.update(entry.extras)
        else:
            self._by_id[entry.feature] = entry
        self._index = None

    def merge(self, other: FeatureCatalog) -> None:
        """Add every entry of ``other`` (e.g. explanations beside an automatic catalog's stats)."""
        for entry in other._by_id.values():
            self.add(entry)

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, feature: int) -> bool:
        return feature in self._by_id

    def get(self, feature: int) -> FeatureEntry | None:
        return self._by_id.get(feature)

    def ids(self) -> list[int]:
        return sorted(self._by_id)

    # -- search -----------------------------------------------------------------------------

    def _bm25_index(self):
        if self._index is None:
            entries = [e for e in self._by_id.values() if e.search_text.strip()]
            docs = [Counter(tokenize(e.search_text)) for e in entries]
            df = Counter(t for d in docs for t in d)
            avg = sum(sum(d.values()) for d in docs) / max(1, len(docs))
            self._index = (entries, docs, df, avg)
        return self._index

    def bm25(self, query: str, entries: list[FeatureEntry]) -> list[float]:
        _, docs, df, avg = self._bm25_index()
        n = len(docs)
        by_id = {id(e): d for e, d in zip(self._index[0], docs, strict=True)}
        terms = set(tokenize(query))
        k1, b = 1.2, 0.75
        scores = []
        for e in entries:
            doc = by_id[id(e)]
            length = sum(doc.values())
            s = 0.0
            for t in terms:
                tf = doc.get(t, 0)
                if tf:
                    idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                    s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / max(avg, 1e-9)))
            scores.append(s)
        return scores

    def search(self, query: str, limit: int = 10, scorer: Scorer | None = None) -> list[tuple[FeatureEntry, float]]:
        """Entries best matching ``query``, highest score first; zero-score entries are dropped."""
        entries = self._bm25_index()[0]
        scores = (scorer or self.bm25)(query, entries)
        ranked = sorted(
            ((e, s) for e, s in zip(entries, scores, strict=True) if s > 0),
            key=lambda es: (-es[1], es[0].feature),
        )
        return ranked[: max(0, limit)]

    # -- reading ----------------------------------------------------------------------------

    @classmethod
    def load_all(cls, paths: Iterable[str | Path]) -> FeatureCatalog:
        """Every file of ``paths`` read and merged in order (``merge``: a later file's fields for a
        feature are laid over the earlier ones'), as ``serve`` stacks a model's catalogs: statistics,
        then explanations, then measured effects."""
        catalog = cls()
        for path in paths:
            catalog.merge(cls.load(path))
        return catalog

    @classmethod
    def load(cls, path: str | Path) -> FeatureCatalog:
        """Read either format, told apart by content (a JSON array/object vs one object per line)."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise CatalogError(f"{path}: missing") from None
        except UnicodeDecodeError as e:
            raise CatalogError(f"{path}: not UTF-8 text ({e})") from None
        stripped = text.lstrip()
        if stripped.startswith("["):
            return cls(_paper_entries(path, text))
        try:  # a single JSON object may be one paper-style dict or one JSONL row
            obj = json.loads(text)
        except json.JSONDecodeError:
            return cls(_jsonl_entries(path, text))
        if isinstance(obj, dict) and "feature" not in obj:
            return cls(_paper_entries(path, json.dumps([obj])))
        return cls(_jsonl_entries(path, text))


def _paper_entries(path: Path, text: str) -> Iterable[FeatureEntry]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CatalogError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise CatalogError(f"{path}: expected a JSON list of objects")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise CatalogError(f"{path}: item {i} is {type(item).__name__}, expected an object")
        for key, value in item.items():
            m = _PAPER_KEY.match(key)
            if not m:
                raise CatalogError(f"{path}: item {i} key {key!r} is not '<hookpoint>_feature<id>'")
            if not isinstance(value, str):
                raise CatalogError(f"{path}: item {i} value for {key!r} is not a string")
            yield FeatureEntry(int(m["id"]), value.strip(), hookpoint=m["hook"])


def _jsonl_entries(path: Path, text: str) -> Iterable[FeatureEntry]:
    for lineno, row in json_objects(text.splitlines(), path, CatalogError):
        fid = row.pop("feature", None)
        if isinstance(fid, bool) or not isinstance(fid, int) or fid < 0:
            raise CatalogError(f"{path}:{lineno}: 'feature' must be a non-negative integer, got {fid!r}")
        explanation = row.pop("explanation", "") or ""
        if not isinstance(explanation, str):
            raise CatalogError(f"{path}:{lineno}: 'explanation' must be a string")
        hook = row.pop("hookpoint", None)
        _resolve_images(row, path.parent)
        yield FeatureEntry(fid, explanation.strip(), hookpoint=hook, extras=row)


def _resolve_images(row: dict, root: Path) -> None:
    """Top images named relative to the catalog (as ``bundle_catalog`` writes them) are read from
    beside it, wherever the server was started."""
    for entry in row.get("top_images") or []:
        if isinstance(entry, dict) and isinstance(entry.get("image"), str) and not Path(entry["image"]).is_absolute():
            entry["image"] = str(root / entry["image"])


# What an explained row keeps when shipped beside a catalog (``bundle_catalog(explained_only=True)``):
# the explanation and its evidence, not the explain run's statistics, so that merged over the
# catalog the catalog's statistics (and every steering value drawn from them) stay.
EXPLANATION_KEYS = ("feature", "explanation", "explainer", "scores", "top_images")


def explanation_rows(rows: list[dict]) -> list[dict]:
    """The rows an explainer explained (status ``ok``, a non-empty explanation), cut to
    ``EXPLANATION_KEYS``; an explainer named by a local path is named by its last part, which is
    all the path means on another machine."""
    kept = []
    for row in rows:
        meta = row.get("explainer")
        if not (isinstance(meta, dict) and meta.get("status") == "ok" and str(row.get("explanation", "")).strip()):
            continue
        row = {k: row[k] for k in EXPLANATION_KEYS if k in row}
        if isinstance(meta.get("model"), str) and Path(meta["model"]).is_absolute():
            row["explainer"] = {**meta, "model": Path(meta["model"]).name}
        kept.append(row)
    return kept


def bundle_catalog(src: str | Path, out_dir: str | Path, images_dir: str = "images", explained_only: bool = False) -> dict:
    """Copies a JSONL catalog into ``out_dir`` with every top image it names, so the catalog can
    travel (ship in a package, move to another machine): images go to ``out_dir/images`` under
    their content hash, and the rows name them relative to the catalog. ``explained_only`` ships
    an explain run's explanations alone (``explanation_rows``), to be merged over a catalog."""
    import hashlib

    src, out_dir = Path(src), Path(out_dir)
    (out_dir / images_dir).mkdir(parents=True, exist_ok=True)
    copied: dict[str, str] = {}
    rows = [row for _, row in json_objects(src.read_text().splitlines(), src, CatalogError)]
    if explained_only:
        rows = explanation_rows(rows)
    for row in rows:
        _resolve_images(row, src.parent)
        for entry in row.get("top_images") or []:
            original = entry.get("image")
            if not isinstance(original, str):
                continue
            if original not in copied:
                try:
                    data = Path(original).read_bytes()
                except OSError as e:
                    raise CatalogError(f"{src}: feature {row.get('feature')}'s top image {original}: {e.strerror}") from None
                name = f"{images_dir}/{hashlib.sha256(data).hexdigest()[:16]}{Path(original).suffix}"
                (out_dir / name).write_bytes(data)
                copied[original] = name
            entry["image"] = copied[original]
    out = out_dir / src.name
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(out)
    return {"catalog": str(out), "features": len(rows), "images": len(copied)}
