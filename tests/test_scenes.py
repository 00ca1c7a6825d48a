"""`lmm-steer scenes generate`: deterministic scenes whose masks, annotations and answers agree
with the pixels they describe."""

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from lmm_steer.scenes.generate import (
    BACKGROUNDS,
    COLOURS,
    DARKEN,
    SHAPES,
    generate,
    make_scene,
    rle_decode,
    rle_encode,
)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    summary = generate(out, 60, seed=7)
    return out, summary


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _coco_and_graphs(out):
    return (json.loads((out / "annotations.json").read_text()),
            json.loads((out / "scenes.json").read_text())["scenes"])


def test_same_seed_same_scenes_and_a_shorter_run_is_a_prefix(tmp_path, split):
    out, _ = split
    generate(tmp_path / "a", 5, seed=7)
    generate(tmp_path / "b", 5, seed=8)
    for i in range(5):
        name = f"images/{i:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (out / name).read_bytes()
    assert any((tmp_path / "a" / f"images/{i:06d}.png").read_bytes() != (tmp_path / "b" / f"images/{i:06d}.png").read_bytes()
               for i in range(5))
    first = json.loads((tmp_path / "a" / "scenes.json").read_text())["scenes"]
    assert first == json.loads((out / "scenes.json").read_text())["scenes"][:5]


def test_rle_round_trips_masks_that_start_inside_and_outside():
    rng = np.random.default_rng(0)
    for mask in (rng.random((9, 7)) > 0.5, np.ones((4, 5), bool), np.zeros((3, 3), bool)):
        rle = rle_encode(mask)
        assert rle["size"] == list(mask.shape) and sum(rle["counts"]) == mask.size
        assert np.array_equal(rle_decode(rle), mask)
    # COCO's order: column-major, the first run counts background pixels (0 when the corner is set)
    assert rle_encode(np.array([[1, 0], [1, 1]], bool))["counts"] == [0, 2, 1, 1]


def test_masks_are_the_drawing(split):
    out, summary = split
    coco, scenes = _coco_and_graphs(out)
    by_image = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    assert len(coco["annotations"]) == summary["objects"] and len(coco["images"]) == 60
    checked_background = 0
    for image in coco["images"]:
        pixels = np.array(Image.open(out / image["file_name"]))
        scene = scenes[image["id"] - 1]
        union = np.zeros(pixels.shape[:2], bool)
        for ann, obj in zip(by_image[image["id"]], scene["objects"], strict=True):
            mask = rle_decode(ann["segmentation"])
            assert not (mask & union).any()  # every pixel belongs to one object at most
            union |= mask
            assert mask.sum() == ann["area"] > 0
            assert (pixels[mask] == COLOURS[ann["attributes"]["colour"]]).all()
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert SHAPES[ann["category_id"] - 1] == obj["shape"]
        if scene["texture"] == "plain":
            assert (pixels[~union] == BACKGROUNDS[scene["background"]]).all()
            checked_background += 1
    assert checked_background >= 10


# pycocotools 2.0.x passes copy=False to numpy 2's __array__ (its warning, not ours)
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_cocos_own_reader_loads_the_annotations_and_their_masks(split):
    from pycocotools.coco import COCO

    out, summary = split
    coco = COCO(str(out / "annotations.json"))
    assert len(coco.getImgIds()) == 60 and len(coco.getAnnIds()) == summary["objects"]
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == sorted(SHAPES)
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert np.array_equal(coco.annToMask(ann).astype(bool), rle_decode(ann["segmentation"]))


ENGLISH_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
                   "hexagon": "hexagons", "star": "stars", "cross": "crosses"}


def test_answers_agree_with_the_coco_annotations(split):
    out, _ = split
    coco, scenes = _coco_and_graphs(out)
    objects = {}
    for ann in coco["annotations"]:
        mask = rle_decode(ann["segmentation"])
        ys, xs = np.nonzero(mask)
        objects.setdefault(f"images/{ann['image_id'] - 1:06d}.png", []).append(
            (SHAPES[ann["category_id"] - 1], ann["attributes"]["colour"], ann["attributes"]["size"], xs.mean()))
    counts = Counter()
    words = ("zero", "one", "two", "three", "four", "five", "six")
    for row in _rows(out / "conversations.jsonl"):
        objs, q, a = objects[row["image"]], row["conversations"][0]["value"], row["answer"]
        assert row["conversations"][1]["value"] == a and q.startswith("<image>\n")
        counts[row["type"]] += 1
        if row["type"] == "colour":
            shape = q.split("the ")[1].split("?")[0]
            assert [c for s, c, _, _ in objs if s == shape] == [a]
        elif row["type"] == "shape":
            colour = q.split("the ")[1].split(" object")[0]
            assert [s for s, c, _, _ in objs if c == colour] == [a]
        elif row["type"] == "count":
            what = q.split("How many ")[1].split(" are")[0]
            assert what.endswith(" objects") or what in ENGLISH_PLURALS.values(), q
            n = sum(c == what.split()[0] for _, c, _, _ in objs) if what.endswith("objects") else \
                sum(what == ENGLISH_PLURALS[s] for s, _, _, _ in objs)
            assert words[n] == a
        elif row["type"] == "exist":
            colour, shape = q.split("Is there a ")[1].split("?")[0].split()
            assert a == ("yes" if (shape, colour) in {(s, c) for s, c, _, _ in objs} else "no")
        else:  # left / right: the answer names one object, nearest on that side of the subject
            graph = scenes[int(row["image"][7:13])]["objects"]
            colour, shape = q.split("of the ")[1].split("?")[0].split()
            [(subject, r)] = [(o["centre"][0], o["radius"]) for o in graph if (o["shape"], o["colour"]) == (shape, colour)]
            [other] = [o["centre"][0] for o in graph if f"a {o['size']} {o['colour']} {o['shape']}" == a]
            # clearly to that side: centres further apart than half the two radii
            sign = -1 if row["type"] == "left" else 1
            side = [o["centre"][0] for o in graph if sign * (o["centre"][0] - subject) > (o["radius"] + r) / 2]
            assert other in side and abs(other - subject) == min(abs(x - subject) for x in side)
    assert set(counts) == {"colour", "shape", "count", "exist", "left", "right"}, counts


def test_every_shape_colour_and_difficulty_occurs_and_regions_highlight_one_object(split):
    out, _ = split
    scenes = json.loads((out / "scenes.json").read_text())["scenes"]
    objs = [o for s in scenes for o in s["objects"]]
    assert {o["shape"] for o in objs} == set(SHAPES) and len(SHAPES) >= 6
    assert {o["colour"] for o in objs} == set(COLOURS) and len(COLOURS) == 8
    assert {o["size"] for o in objs} == {"small", "medium", "large"}
    assert {len(s["objects"]) for s in scenes} == set(range(1, 7))
    assert len({s["background"] for s in scenes}) >= 5
    tags = Counter(t for row in _rows(out / "conversations.jsonl") for t in row["difficulty"])
    assert set(tags) == {"small", "low_contrast", "near_colours", "occluded"}, tags
    regions = _rows(out / "regions.jsonl")
    assert len(regions) == 60
    for row in regions[:10]:
        full = np.array(Image.open(out / row["scene"])).astype(int)
        shaded = np.array(Image.open(out / row["image"])).astype(int)
        obj = next(o for o in scenes[int(row["scene"][7:13])]["objects"] if o["id"] == row["object"])
        inside = (shaded == full).all(-1)
        assert (shaded[~inside] == (full[~inside] * DARKEN).astype(int)).all()
        assert row["answer"] == f"{obj['size']} {obj['colour']} {obj['shape']}"
        assert row["conversations"][1]["value"] == f"A {row['answer']}."


def test_the_sae_trainer_reads_the_conversations(split):
    from lmm_steer.training.data import iter_examples

    out, summary = split
    examples = list(iter_examples(str(out / "conversations.jsonl")))
    assert len(examples) == summary["questions"]
    assert all(len(e.images) == 1 and e.images[0].endswith(".png") for e in examples)
    assert Image.open(examples[0].images[0]).size == (128, 128)


def test_dialogues_hold_each_scene_s_questions_once_with_the_image_once(split):
    from lmm_steer.training.data import iter_examples

    out, summary = split
    questions = _rows(out / "conversations.jsonl")
    dialogues = _rows(out / "dialogues.jsonl")
    assert len(dialogues) == len({q["image"] for q in questions})
    assert sum(len(d["conversations"]) // 2 for d in dialogues) == summary["questions"]
    for dialogue in dialogues:
        mine = [q for q in questions if q["image"] == dialogue["image"]]
        turns = dialogue["conversations"]
        assert [t["value"] for t in turns[1::2]] == [q["conversations"][1]["value"] for q in mine]
        # the image and the format hint come once, on the first question, as a caller asks it
        assert turns[0]["value"] == mine[0]["conversations"][0]["value"]
        assert all("<image>" not in t["value"] and "Answer in" not in t["value"] for t in turns[2::2])
    example = next(iter_examples(str(out / "dialogues.jsonl")))
    assert len(example.images) == 1 and len(example.messages) == len(dialogues[0]["conversations"])


def test_crowded_scenes_still_show_every_object():
    for index in range(40):
        scene, _, masks = make_scene(3, index, size=64)
        assert all(m.any() for m in masks) and all(o.occlusion <= 0.5 for o in scene.objects)


def test_command_line_writes_a_split_and_refuses_bad_counts(tmp_path):
    run = [sys.executable, "-m", "lmm_steer.cli", "scenes", "generate", "--out", str(tmp_path / "s"), "--seed", "1"]
    ok = subprocess.run([*run, "--n", "2"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["scenes"] == 2 and (tmp_path / "s" / "images" / "000001.png").exists()
    bad = subprocess.run([*run, "--n", "0"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--n must be at least 1, got 0" in bad.stderr
    train = [sys.executable, "-m", "lmm_steer.cli", "scenes", "train", "--data", str(tmp_path / "s"),
             "--out", str(tmp_path / "run"), "--lora-lr", "0"]
    frozen = subprocess.run(train, capture_output=True, text=True)
    assert frozen.returncode != 0 and "--lora-lr and --vision-lr are all 0" in frozen.stderr
    assert not (tmp_path / "run").exists()
    base = train[:-2]
    missing = subprocess.run([*base, "--init", str(tmp_path / "nothing.safetensors")], capture_output=True, text=True)
    assert missing.returncode != 0 and "--init" in missing.stderr and "no such file" in missing.stderr
    share = subprocess.run([*base, "--highlight-share", "1.5"], capture_output=True, text=True)
    assert share.returncode != 0 and "--highlight-share must be within [0, 1], got 1.5" in share.stderr
    highlights = [sys.executable, "-m", "lmm_steer.cli", "sae", "highlights", "--data", str(tmp_path / "s")]
    added = subprocess.run(highlights, capture_output=True, text=True)
    assert added.returncode == 0 and json.loads(added.stdout)["highlights"] == 2, added.stderr
    assert len((tmp_path / "s" / "highlights.jsonl").read_text().splitlines()) == 2
    nowhere = subprocess.run([*highlights[:-1], str(tmp_path / "none")], capture_output=True, text=True)
    assert nowhere.returncode != 0 and "no scenes.json" in nowhere.stderr
    assert not (tmp_path / "run").exists()
