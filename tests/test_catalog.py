import json

import pytest

from sae_weights import CatalogError, FeatureCatalog
from sae_weights.catalog import FeatureEntry

PAPER = [
    {"model.layers.24_feature17": "Text in images, especially printed signs and labels"},
    {"model.layers.24_feature4096": "Dogs, particularly their faces and fur"},
    {"model.layers.24_feature99": "Sky and clouds in outdoor landscapes"},
    {"model.layers.24_feature5": "Written text and handwriting on paper"},
]


def test_paper_format_parses_and_searches(tmp_path):
    path = tmp_path / "explanations.json"
    path.write_text(json.dumps(PAPER))
    cat = FeatureCatalog.load(path)
    assert len(cat) == 4 and cat.get(4096).explanation.startswith("Dogs")
    assert cat.get(17).hookpoint == "model.layers.24"
    assert cat.get(3) is None
    hits = cat.search("dog faces", limit=5)
    assert [e.feature for e, _ in hits] == [4096]
    text_hits = [e.feature for e, _ in cat.search("text", limit=5)]
    assert set(text_hits) == {17, 5}
    assert cat.search("text", limit=1)[0][1] >= cat.search("text", limit=2)[1][1]
    assert cat.search("submarine") == []


def test_jsonl_rows_with_extras_and_merge(tmp_path):
    path = tmp_path / "cat.jsonl"
    path.write_text('{"feature": 3, "explanation": "red apples", "density": 0.01}\n\n'
                    '{"feature": 8, "explanation": "green apples and pears", "max_activation": 12.5}\n')
    cat = FeatureCatalog.load(path)
    assert cat.get(3).extras == {"density": 0.01}
    assert [e.feature for e, _ in cat.search("red apples")][0] == 3
    more = tmp_path / "more.jsonl"
    more.write_text('{"feature": 3, "top_contexts": ["an apple a day"]}\n')
    cat.merge(FeatureCatalog.load(more))
    assert cat.get(3).explanation == "red apples" and cat.get(3).extras["top_contexts"] == ["an apple a day"]
    stacked = FeatureCatalog.load_all([path, more])  # the files merged in order, as serve stacks them
    assert [(e.feature, e.explanation, e.extras) for e in map(stacked.get, stacked.ids())] == [
        (f, cat.get(f).explanation, cat.get(f).extras) for f in cat.ids()]
    assert FeatureCatalog.load_all([more, path]).get(3).extras == {"density": 0.01, "top_contexts": ["an apple a day"]}


def test_custom_scorer_replaces_bm25(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"feature": 1, "explanation": "cats"}\n{"feature": 2, "explanation": "kittens"}\n')
    cat = FeatureCatalog.load(path)
    # an "embedding" scorer that knows kittens are cats, where lexical search cannot
    hits = cat.search("cat", scorer=lambda q, es: [1.0 if "kitten" in e.explanation else 0.5 for e in es])
    assert [e.feature for e, _ in hits] == [2, 1]


@pytest.mark.parametrize("text,msg", [
    ('{"feature": "x", "explanation": "a"}\n', r"c.jsonl:1: 'feature' must be a non-negative integer"),
    ('{"feature": 1}\n{oops\n', r"c.jsonl:2: not valid JSON"),
    ('[{"layer24_f1": "x"}]', r"key 'layer24_f1' is not '<hookpoint>_feature<id>'"),
    ('[1, 2]', r"item 0 is int"),
])
def test_bad_catalog_files(tmp_path, text, msg):
    path = tmp_path / "c.jsonl"
    path.write_text(text)
    with pytest.raises(CatalogError, match=msg):
        FeatureCatalog.load(path)


def test_search_covers_top_contexts_of_automatic_catalogs(tmp_path):
    path = tmp_path / "auto.jsonl"
    rows = [
        {"feature": 1, "explanation": "", "density": 0.01,
         "top_contexts": [{"text": "the «dog» barked", "activation": 5.0}, {"text": "a «puppy» dog", "activation": 4.0}]},
        {"feature": 2, "explanation": "", "top_contexts": [{"text": "boiling «water» in a pot", "activation": 3.0}]},
        {"feature": 3, "explanation": "", "top_contexts": []},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cat = FeatureCatalog.load(path)
    assert [e.feature for e, _ in cat.search("dog")] == [1]
    assert [e.feature for e, _ in cat.search("water")] == [2]


def test_a_bundled_catalog_carries_its_images_and_is_read_from_anywhere(tmp_path, monkeypatch):
    """`sae bundle` copies each named top image once (by content), rewrites the rows to name them
    relative to the catalog, and loading resolves them beside the catalog, not the working
    directory; a missing image is an error naming the feature and the file."""
    from lmm_steer.cli import main
    from sae_weights.catalog import bundle_catalog

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"png-a")
    (data / "b.png").write_bytes(b"png-b")
    rows = [{"feature": 1, "explanation": "red", "top_images": [{"image": str(data / "a.png"), "grid": [[1.0]]},
                                                                {"image": str(data / "b.png"), "grid": [[0.5]]}]},
            {"feature": 2, "explanation": "", "top_images": [{"image": str(data / "a.png"), "grid": [[2.0]]}]},
            {"feature": 3, "explanation": "text only", "top_contexts": [{"text": "«x»"}]}]
    src = tmp_path / "catalog.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["sae", "bundle", str(src), str(tmp_path / "ship")]) == 0
    written = [json.loads(line) for line in (tmp_path / "ship" / "catalog.jsonl").read_text().splitlines()]
    names = [im["image"] for r in written for im in r.get("top_images", [])]
    assert names[0] == names[2] != names[1] and all(n.startswith("images/") for n in names)
    assert len(list((tmp_path / "ship" / "images").iterdir())) == 2
    assert written[0]["top_images"][1]["grid"] == [[0.5]] and written[2]["top_contexts"] == rows[2]["top_contexts"]
    moved = tmp_path / "elsewhere"
    (tmp_path / "ship").rename(moved)
    (data / "a.png").unlink()  # the bundle no longer needs the originals
    monkeypatch.chdir(tmp_path)
    cat = FeatureCatalog.load(moved / "catalog.jsonl")
    first = cat.get(1).extras["top_images"][0]["image"]
    assert open(first, "rb").read() == b"png-a"
    with pytest.raises(CatalogError, match=r"feature 1's top image .*a\.png"):
        bundle_catalog(src, tmp_path / "again")


def test_bundling_explained_only_ships_the_explanations_and_keeps_the_catalogs_statistics(tmp_path):
    """`sae bundle --explained-only` keeps the features an explainer explained, with their
    explanation, scores and evidence, and drops the run's statistics, so that merged over the
    catalog it explains, the catalog's maximum (the steering value's source) stays."""
    from lmm_steer.cli import main

    (tmp_path / "a.png").write_bytes(b"png-a")
    image = [{"image": str(tmp_path / "a.png"), "grid": [[1.0]]}]
    rows = [{"feature": 1, "explanation": "red", "max_activation": 0.4, "top_images": image, "scores": {"iou": 0.5},
             "explainer": {"model": str(tmp_path / "explainer-hf"), "status": "ok"}},
            {"feature": 2, "explanation": "", "max_activation": 0.3, "top_images": image,
             "explainer": {"model": "x", "status": "unable"}},
            {"feature": 3, "explanation": "blue", "max_activation": 0.2, "explainer": {"model": "x", "status": "failed"}}]
    src = tmp_path / "explained.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["sae", "bundle", "--explained-only", str(src), str(tmp_path / "ship")]) == 0
    written = [json.loads(line) for line in (tmp_path / "ship" / "explained.jsonl").read_text().splitlines()]
    assert [r["feature"] for r in written] == [1]
    assert set(written[0]) == {"feature", "explanation", "explainer", "scores", "top_images"}
    assert written[0]["explainer"]["model"] == "explainer-hf" and written[0]["top_images"][0]["image"].startswith("images/")
    catalog = FeatureCatalog()
    catalog.add(FeatureEntry(feature=1, explanation="", extras={"max_activation": 7.0}))
    catalog.merge(FeatureCatalog.load(tmp_path / "ship" / "explained.jsonl"))
    assert catalog.get(1).explanation == "red" and catalog.get(1).extras["max_activation"] == 7.0
