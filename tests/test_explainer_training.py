"""Training an explainer of feature highlights (issue #17): `sae highlights` examples answer what
their ground truth shows, and `scenes train --init` fine-tunes from a trained file."""

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from lmm_steer.explain.highlight import highlight, region_mask
from lmm_steer.explain.highlight_examples import MINIMAL_PATCHES, example, write_highlights
from lmm_steer.scenes.generate import generate, make_scene
from lmm_steer.scenes.train import TRAINED_FILE, SceneConversations, SceneTrainConfig, train_scenes_lmm

SEED = 20261206  # a split of its own


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("highlights")
    generate(out, 40, seed=SEED)
    summary = write_highlights(out, per_scene=3)
    assert summary["highlights"] == 120
    return out


def _shares(row, size=128):
    index = int(row["scene"].split("/")[1].split(".")[0])
    scene, _, masks = make_scene(SEED, index, size)
    lit = region_mask(row["grid"], size, size) >= 0.5
    return scene, masks, lit, [float((m & lit).sum() / max(lit.sum(), 1)) for m in masks]


def test_highlight_examples_answer_what_their_ground_truth_shows(split):
    rows = [json.loads(line) for line in (split / "highlights.jsonl").read_text().splitlines()]
    assert set(Counter(r["kind"] for r in rows)) == {"minimal", "object", "colour", "shape", "size", "background"}
    for row in rows:
        scene, masks, lit, shares = _shares(row)
        answer = row["conversations"][1]["value"]
        assert row["answer"] == answer.rstrip(".")
        patches = int(np.sum(row["grid"]))
        # one or two patches are declined whatever they show; anything larger is named
        assert (answer == "Unable.") == (patches <= MINIMAL_PATCHES) == (row["kind"] == "minimal"), row
        if answer == "The background.":
            assert lit.sum() >= 6 * 16 * 16 * 0.5 and sum(shares) < 0.15
        elif answer.startswith("A "):  # one object, which the highlight lights
            named = [i for i, o in enumerate(scene.objects) if f"A {o.phrase()}." == answer]
            assert named and max((masks[i] & lit).sum() for i in named) > 0
        elif answer != "Unable.":  # a group: every member is lit
            value = answer.split()[0].lower().rstrip(".")
            field = row["kind"]
            members = [i for i, o in enumerate(scene.objects)
                       if (o.shape + "s" if field == "shape" else getattr(o, field)) in (value, value.rstrip("s"))
                       or (field == "shape" and o.shape + "es" == value)]
            assert len(members) >= 2 and all((masks[i] & lit).any() for i in members), row
        with Image.open(split / row["scene"]) as im:
            expected = np.asarray(highlight(im, row["grid"]))
        with Image.open(split / row["image"]) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), expected)  # highlighted as `sae explain` does
    assert example(SEED, 3, 1, 128) == example(SEED, 3, 1, 128)


def test_highlights_join_training_only_when_given_a_share(split, tmp_path):
    import random

    plain = tmp_path / "plain"
    shutil.copytree(split, plain, ignore=shutil.ignore_patterns("highlights*"))
    with_h, without = SceneConversations(split), SceneConversations(plain)
    for step in range(30):  # a share of 0 draws exactly what a split without highlights draws
        assert with_h.sample(random.Random(step), 3, 0.2) == without.sample(random.Random(step), 3, 0.2)
    drawn = [with_h.sample(random.Random(step), 3, 0.2, highlight_share=1.0) for step in range(10)]
    assert all(image.startswith("highlights/") for image, _ in drawn)
    with pytest.raises(ValueError, match="no highlights.jsonl"):
        without.sample(random.Random(0), 3, 0.2, highlight_share=0.5)


def test_a_fine_tune_goes_on_from_its_init_file(split, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tiny = dict(clip_steps=2, clip_batch=8, steps=2, batch=1, turns=3, checkpoint_every=2, warmup=1,
                ground_steps=2, ground_batch=4)
    train_scenes_lmm(split, tmp_path / "base", SceneTrainConfig(**tiny))
    with safe_open(str(tmp_path / "base" / TRAINED_FILE), framework="pt") as f:
        metadata = f.metadata()
    base = load_file(tmp_path / "base" / TRAINED_FILE)
    generator = torch.Generator().manual_seed(0)  # a delta far from any fresh start
    init = {k: (torch.randn(v.shape, generator=generator) * 0.05 if k.endswith(".lora_B") else v) for k, v in base.items()}
    save_file(init, str(tmp_path / "init.safetensors"), metadata=metadata)
    summary = train_scenes_lmm(split, tmp_path / "tuned", SceneTrainConfig(
        **{**tiny, "steps": 1}, init=str(tmp_path / "init.safetensors"), highlight_share=1.0, lora_lr=1e-7))
    tuned = load_file(tmp_path / "tuned" / TRAINED_FILE)
    assert tuned.keys() == init.keys() and summary["highlights"] == 120 and summary["clip_seconds"] is None
    assert not (tmp_path / "tuned" / "clip").exists() and not (tmp_path / "tuned" / "grounding.safetensors").exists()
    for key, value in init.items():  # frozen parts as the file had them; the delta one tiny step away
        if key.endswith((".lora_A", ".lora_B")):
            torch.testing.assert_close(tuned[key], value, rtol=0, atol=1e-5, msg=key)
        else:
            assert torch.equal(tuned[key], value), key
