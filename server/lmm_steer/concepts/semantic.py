"""Feature search by meaning: each catalog entry's text embedded once, a query embedded per call,
ranked by cosine similarity plus a share of the lexical (BM25) score.

Features with a measured effect come first: where the query names a word that catalog rows'
``effect`` says their clamp makes the model answer (``lmm-steer sae effects``), those features
lead (those measured over a grid of values before those only screened, each group strongest first:
``effects.rank.rank_key``; their score is 3 or 2 plus the strength, above any score by meaning),
and the rest follow by meaning.

Embeddings are cached as safetensors keyed by a digest of the embedded texts and the embedding
model, beside the catalog when a file ``<catalog>.embeddings.safetensors`` is shipped (the default
catalog ships one), else under ``~/.cache/lmm-steer/embeddings/``.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sae_weights import FeatureCatalog, FeatureEntry

from ..effects.rank import measured_score, measured_word, named_words, rank_key
from ..models.disk_cache import cache_root

_MARKED = re.compile(r"«([^»]*)»")
LEXICAL_WEIGHT = 0.1  # share of the best-normalised BM25 score added to the cosine similarity (a tie-breaker; 0.25 let context words outrank meaning on the dev concepts)


def feature_text(entry: FeatureEntry) -> str:
    """What stands for a feature's meaning: its explanation where it has one, else the words it
    fires on (marked « » in its top contexts), in order of activation. The surrounding context
    text is left out: embedded with it, a feature's vector drifts toward whatever its contexts
    happen to discuss (measured on the dev concepts)."""
    if entry.explanation:
        return entry.explanation
    marked: list[str] = []
    for c in entry.extras.get("top_contexts") or []:
        for m in _MARKED.findall(c.get("text", "") if isinstance(c, dict) else str(c)):
            if m.strip() and m.strip() not in marked:
                marked.append(m.strip())
    return ", ".join(marked)


def cache_path(digest: str) -> Path:
    return cache_root() / "embeddings" / f"{digest}.safetensors"


def shipped_path(catalog_path: str | Path) -> Path:
    return Path(f"{catalog_path}.embeddings.safetensors")


class SemanticIndex:
    def __init__(self, catalog: FeatureCatalog, embedder,
                 catalog_path: str | Path | list[str | Path] | None = None, measured: bool = True) -> None:
        """``measured``: rank features with a measured effect first (False: by meaning alone)."""
        self.catalog, self.embedder = catalog, embedder
        self.measured = measured_features(catalog) if measured else {}
        self.ids = catalog.ids()
        texts = [feature_text(catalog.get(i)) for i in self.ids]
        digest = hashlib.sha256("\n".join([embedder.name, *map(str, self.ids), *texts]).encode()).hexdigest()[:24]
        self.digest = digest
        self.vectors = self._load(catalog_path, digest)
        if self.vectors is None:
            self.vectors = embedder.encode(texts) if texts else torch.zeros(0, embedder.dim)
            self._save(digest)
        self.row = {fid: i for i, fid in enumerate(self.ids)}

    def _load(self, catalog_path, digest) -> torch.Tensor | None:
        """A shipped index beside any of the catalog's files (the last one first: `sae embed` writes
        beside the last of several), else the cache; only one whose digest matches this catalog."""
        paths = catalog_path if isinstance(catalog_path, list | tuple) else [catalog_path] if catalog_path else []
        for path in [shipped_path(p) for p in reversed(paths)] + [cache_path(digest)]:
            if path.exists():
                with safe_open(str(path), framework="pt") as f:
                    if (f.metadata() or {}).get("digest") == digest:  # else: another catalog or model
                        return f.get_tensor("vectors").float()
        return None

    def _save(self, digest) -> None:
        path = cache_path(digest)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            self._write(tmp)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: the index still works, it is rebuilt next start

    def _write(self, path: Path) -> None:
        save_file({"vectors": self.vectors.half()}, str(path), metadata={"digest": self.digest, "model": self.embedder.name})

    def write_beside(self, catalog_path: str | Path) -> Path:
        """Ship the index with its catalog (what `lmm-steer sae embed` writes)."""
        path = shipped_path(catalog_path)
        self._write(path)
        return path

    def similarities(self, query: str) -> torch.Tensor:
        """Cosine similarity of ``query`` with every feature, in ``self.ids`` order."""
        q = self.embedder.encode([query])[0]
        return self.vectors @ q

    def scorer(self, lexical_weight: float = LEXICAL_WEIGHT):
        """A catalog ``Scorer``: cosine similarity plus ``lexical_weight`` x BM25 / its best value."""

        def score(query: str, entries: list[FeatureEntry]) -> list[float]:
            sims = self.similarities(query)
            lexical = self.catalog.bm25(query, entries)
            best = max(lexical, default=0.0) or 1.0
            return [float(sims[self.row[e.feature]]) + lexical_weight * lx / best if e.feature in self.row else 0.0
                    for e, lx in zip(entries, lexical, strict=True)]

        return score

    def search(self, query: str, limit: int = 10):
        """Features measured to make the model say a word the query names, strongest first, then the
        rest by meaning (the module docstring)."""
        first = [(entry, score) for word in named_words(query, self.measured) for entry, score in self.measured[word]]
        seen: set[int] = set()
        first = [(e, s) for e, s in first if not (e.feature in seen or seen.add(e.feature))][:max(0, limit)]
        rest = self.catalog.search(query, limit + len(first), scorer=self.scorer()) if len(first) < limit else []
        return first + [(e, s) for e, s in rest if e.feature not in seen][:max(0, limit - len(first))]


def measured_features(catalog: FeatureCatalog) -> dict[str, list[tuple[FeatureEntry, float]]]:
    """``word -> [(entry, score)]``, best first (``effects.rank.rank_key``, then by id): the catalog's
    features whose measured effect steers to that word, with their search scores."""
    out: dict[str, list[tuple[FeatureEntry, float]]] = {}
    for fid in catalog.ids():
        entry = catalog.get(fid)
        word = measured_word(entry.extras)
        if word is not None:
            out.setdefault(word, []).append((entry, measured_score(entry.extras["effect"], entry.extras.get("steer"))))
    for ranked in out.values():
        ranked.sort(key=lambda es: (tuple(-k for k in rank_key(es[0].extras["effect"], es[0].extras.get("steer"))),
                                     es[0].feature))
    return out


def index_or_none(catalog: FeatureCatalog, paths: list[str], embedder: str | None = None, warn=None,
                  measured: bool = True):
    """Search by meaning over ``catalog``, or None (no catalog, embedding turned off with "none", or
    the default embedding model not installed: search then works by words alone, and ``warn`` is
    told why)."""
    if not len(catalog) or (embedder or "").lower() == "none":
        return None
    from .embedder import EmbedderMissing, SentenceEmbedder, default_embedder

    try:
        model = SentenceEmbedder(embedder) if embedder else default_embedder()
    except EmbedderMissing as e:
        if warn is not None:
            warn(f"search by words only: {e}")
        return None
    return SemanticIndex(catalog, model, list(paths), measured)
