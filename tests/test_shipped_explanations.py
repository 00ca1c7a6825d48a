"""The explained catalog shipped with the scenes model (issue #17): what serve loads with it, and
scores that `sae score`'s arithmetic reproduces on the split it was made on (seed 12, regenerated)."""

import hashlib
import json
from pathlib import Path

import pytest

from lmm_steer.explain.score import feature_ious, load_annotations
from lmm_steer.scenes.generate import generate
from sae_weights import FeatureCatalog
from sae_weights.default import SHIPPED, sources_for

SHIPPED_SCENES = SHIPPED["builtin:scenes-llava-next"]
EXPLAINED = SHIPPED_SCENES.explanations
ROWS = [json.loads(line) for line in EXPLAINED.read_text().splitlines()] if EXPLAINED.exists() else []
pytestmark = pytest.mark.skipif(not ROWS, reason="no explained catalog in this checkout")


def test_serve_merges_the_explanations_over_the_catalog_and_keeps_its_steering_values():
    sources = sources_for("builtin:scenes-llava-next")
    assert sources.catalogs == (str(SHIPPED_SCENES.catalog), str(EXPLAINED), str(SHIPPED_SCENES.effects))
    plain = FeatureCatalog.load(sources.catalogs[0])
    merged = FeatureCatalog.load_all(sources.catalogs)
    assert len(merged) == len(plain) == 4096
    for row in ROWS:
        entry = merged.get(row["feature"])
        assert entry.explanation == row["explanation"] and entry.extras["scores"] == row["scores"]
        # steering values come from the catalog's statistics, not from the explanation run
        assert entry.extras["max_activation"] == plain.get(row["feature"]).extras["max_activation"]
        assert all(Path(im["image"]).is_file() for im in entry.extras["top_images"])
    top, _ = merged.search("red", 1)[0]
    assert "red" in top.explanation.lower()


def test_the_shipped_scores_are_what_scoring_gives_on_the_split_they_were_made_on(tmp_path):
    generate(tmp_path, 300, seed=12)  # `scenes generate --n 300 --seed 12`: the explanation split
    by_hash = {hashlib.sha256(p.read_bytes()).hexdigest()[:16]: p for p in (tmp_path / "images").glob("*.png")}
    ann = load_annotations(tmp_path / "annotations.json")
    checked = 0
    for row in ROWS[::5]:
        images = [{**im, "image": str(by_hash[Path(im["image"]).stem])} for im in row["top_images"]]
        got = feature_ious(ann, row["explanation"], images, {})
        for key in ("iou", "ceiling_iou", "best_iou"):
            assert got[key] == pytest.approx(row["scores"][key], abs=1e-3), (row["feature"], key)
        assert got["names_attribute"] == row["scores"]["names_attribute"]
        assert got["best_phrase"] == row["scores"]["best_phrase"] and got["best_iou"] >= got["iou"]
        checked += 1
    assert checked >= 39
    ious = [r["scores"]["iou"] for r in ROWS]
    assert len(ROWS) == 199 and round(sum(ious) / len(ious), 3) == 0.302  # docs/explain.md's run-12 table
    bounds = [r["scores"]["best_iou"] for r in ROWS]
    assert round(sum(bounds) / len(bounds), 3) == 0.435  # the bound in docs/explain.md


def test_the_default_serves_the_scenes_model_with_its_presets_and_a_shipped_search_index(monkeypatch, tmp_path):
    """With no arguments, serve loads the scenes model, its SAE, both catalogs and its presets; the
    search-by-meaning index over the merged catalog ships beside it, so a first start embeds nothing."""
    from lmm_steer.concepts.embedder import DEFAULT_EMBEDDER
    from lmm_steer.concepts.semantic import SemanticIndex
    from sae_weights.default import DEFAULT_MODEL

    assert DEFAULT_MODEL == "builtin:scenes-llava-next"
    sources = sources_for(DEFAULT_MODEL)
    assert sources.presets == str(SHIPPED_SCENES.presets)
    assert sorted(p.stem for p in SHIPPED_SCENES.presets.glob("*.json")) == ["circle-not-hexagon",
                                                                             "circle-not-hexagon-gated", "fitted"]
    assert sources_for(DEFAULT_MODEL, presets="none").presets == "none"
    assert sources_for(DEFAULT_MODEL, sae="builtin:random-topk").presets is None  # presets belong to their SAE
    assert sources_for("builtin:smollm2-135m-instruct").presets is None

    class NoEmbedding:  # the embedding model's name, and no way to embed: only a shipped index will do
        name, dim = DEFAULT_EMBEDDER, 384

        def encode(self, texts):
            raise AssertionError(f"embedded {len(texts)} texts at start")

    monkeypatch.setenv("LMM_STEER_CACHE", str(tmp_path))  # no cached index to fall back on
    merged = FeatureCatalog.load_all(sources.catalogs)
    index = SemanticIndex(merged, NoEmbedding(), list(sources.catalogs))
    assert index.vectors.shape == (4096, 384)
