"""``lmm-steer sae score``: grounding, IoU, ceiling, attribute and CLIP arithmetic on constructed cases,
and the command on a generated split whose activation grids are drawn from its own masks."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from lmm_steer.explain.score import Annotations, derangement, feature_ious, iou, score
from lmm_steer.scenes.generate import generate, patch_shares, rle_decode, rle_encode


def _coco(tmp_path):
    """One 8x8 image: a small red circle on the left half's top, a large blue square on the right half."""
    red = np.zeros((8, 8), bool)
    red[0:4, 0:4] = True
    blue = np.zeros((8, 8), bool)
    blue[:, 4:8] = True
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
            "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle_encode(red),
                 "attributes": {"colour": "red", "size": "small", "occlusion": 0.0}},
                {"id": 2, "image_id": 1, "category_id": 2, "segmentation": rle_encode(blue),
                 "attributes": {"colour": "blue", "size": "large"}}]}
    return Annotations(coco, tmp_path), str(tmp_path / "a.png")


def test_an_explanation_names_categories_attributes_and_plurals(tmp_path):
    ann, _ = _coco(tmp_path)
    assert ann.named("A small red circle.") == {("size", "small"), ("colour", "red"), ("category", "circle")}
    assert ann.named("blue squares") == {("colour", "blue"), ("category", "square")}
    assert ann.named("curved edges") == set()


def test_grounding_and_iou_on_a_constructed_image(tmp_path):
    ann, image = _coco(tmp_path)
    grid = [[1.0, 0.0], [0.0, 0.0]]  # the top-left quarter is active: exactly the red circle
    red = ann.grounded({("colour", "red")}, image, (8, 8))
    assert red.sum() == 16 and iou(red, red) == 1.0
    assert ann.grounded({("colour", "red"), ("category", "square")}, image, (8, 8)).sum() == 0
    got = feature_ious(ann, "red circle", [{"image": image, "grid": grid}], {})
    assert got["iou"] == pytest.approx(1.0, abs=0.07) and got["names_attribute"]  # bilinear rounds one corner
    assert got["attribute"] == [["category", "circle"], ["colour", "red"], ["size", "small"]] and got["ceiling_iou"] == pytest.approx(1.0, abs=0.07)
    wrong = feature_ious(ann, "blue square", [{"image": image, "grid": grid}], {})
    assert wrong["iou"] == 0.0 and not wrong["names_attribute"]
    nothing = feature_ious(ann, "curved edges", [{"image": image, "grid": grid}], {})
    assert nothing["iou"] == 0.0 and nothing["named"] == []


def test_the_best_explanation_can_be_a_group_no_single_region_matches(tmp_path):
    """Two red objects both active: "red" grounds to both (IoU 1), while the best single object
    covers half; the best phrase is the exact upper bound of every explanation's IoU."""
    ann, image = _coco(tmp_path)
    second = np.zeros((8, 8), bool)
    second[4:8, 0:4] = True
    coco = {"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle_encode(~second & (np.arange(8)[None, :] < 4)),
                             "attributes": {"colour": "red", "size": "small"}},
                            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": rle_encode(second),
                             "attributes": {"colour": "red", "size": "large"}}]}
    ann = Annotations(coco, tmp_path)
    grid = [[1.0, 0.0], [1.0, 0.0]]  # the left half: both red objects
    got = feature_ious(ann, "a small red circle", [{"image": image, "grid": grid}], {})
    assert got["best_phrase"] == [["colour", "red"]] and got["best_iou"] == pytest.approx(1.0, abs=0.07)
    assert got["ceiling_iou"] == pytest.approx(0.5, abs=0.07) and got["iou"] == pytest.approx(0.5, abs=0.07)
    for text in ("red", "circle", "squares", "the background", "large red square", "blue"):
        assert feature_ious(ann, text, [{"image": image, "grid": grid}], {})["iou"] <= got["best_iou"] + 1e-9


class _FixedClip:
    """Embeddings chosen by hand: text i and every image of feature i point the same way."""

    def __init__(self):
        self.vectors = {"red circle": torch.tensor([1.0, 0.0]), "blue square": torch.tensor([0.0, 1.0])}

    def texts(self, texts):
        return torch.stack([self.vectors[t] for t in texts])

    def images(self, images):
        mean = np.asarray(images[0]).mean()
        return torch.tensor([[1.0, 0.0]] if mean > 0 else [[0.0, 1.0]]).expand(len(images), 2)


def test_clip_score_and_the_shuffled_and_random_baselines(tmp_path):
    ann, image = _coco(tmp_path)
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(image)  # bright: _FixedClip reads it as "red circle"
    dark = tmp_path / "b.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(dark)
    rows = [{"feature": 1, "explanation": "red circle", "top_images": [{"image": image, "grid": [[1.0, 0.0], [0.0, 0.0]]}]},
            {"feature": 2, "explanation": "blue square", "top_images": [{"image": str(dark), "grid": [[1.0, 1.0], [1.0, 1.0]]}]},
            {"feature": 3, "explanation": "", "top_images": []}]
    result = score(rows, ann, _FixedClip(), seed=0)
    assert result["features"] == 2
    first = result["per_feature"][0]
    assert first["clip"] == pytest.approx(100.0) and first["shuffled_clip"] == pytest.approx(0.0)
    assert first["random_iou"] == 0.0  # "red circle" on feature 2's unannotated image grounds to nothing
    assert rows[0]["scores"]["iou"] == first["iou"] and "scores" not in rows[2]
    assert result["mean"]["clip"] == pytest.approx(100.0) and result["mean"]["shuffled_clip"] == pytest.approx(0.0)


def test_a_derangement_moves_everything():
    for n in (2, 3, 7):
        order = derangement(n, random.Random(n))
        assert sorted(order) == list(range(n)) and all(i != j for i, j in enumerate(order))


def test_the_score_command_on_grids_drawn_from_the_masks(tmp_path, capsys):
    from lmm_steer.cli import main

    generate(tmp_path, 6, seed=41)
    coco = json.loads((tmp_path / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {img["id"]: str(tmp_path / img["file_name"]) for img in coco["images"]}
    rows = []
    for n, a in enumerate(coco["annotations"][:6]):
        grid = (patch_shares(rle_decode(a["segmentation"]), 32, 32) >= 0.5).reshape(32, 32).astype(float).tolist()
        right = f"{a['attributes']['colour']} {names[a['category_id']]}"
        rows.append({"feature": n, "explanation": right if n % 2 == 0 else "curved edges",
                     "top_images": [{"image": files[a["image_id"]], "activation": 1.0, "grid": grid}]})
    catalog = tmp_path / "explained.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = tmp_path / "score.json"
    assert main(["sae", "score", "--catalog", str(catalog), "--data", str(tmp_path), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    per = {p["feature"]: p for p in result["per_feature"]}
    assert all(per[f]["iou"] > 0.4 for f in (0, 2, 4))  # two yellow stars in one image: their union and all(per[f]["iou"] == 0.0 for f in (1, 3, 5))
    assert result["mean"]["ceiling_iou"] >= result["mean"]["iou"] > result["mean"]["random_iou"]
    assert all(p["best_iou"] >= p["iou"] - 1e-9 for p in result["per_feature"])
    assert all(per[f]["best_iou"] > 0.4 for f in per)  # "curved edges" names nothing; the best phrase still grounds
    written = [json.loads(line) for line in catalog.read_text().splitlines()]
    assert all("scores" in r for r in written) and "| IoU" in capsys.readouterr().out
    assert main(["sae", "score", "--catalog", str(tmp_path / "missing.jsonl"), "--data", str(tmp_path)]) == 2


def test_the_scenes_clip_scores_text_against_highlighted_images(tmp_path):
    from lmm_steer.explain.score import ClipScorer
    from lmm_steer.scenes.vision import VisionConfig, build_vision_tower

    tower = build_vision_tower(VisionConfig(image_size=32, patch_size=16, hidden_size=32, layers=1, heads=2,
                                            intermediate_size=64))
    tower.save_pretrained(tmp_path / "clip")
    clip = ClipScorer(str(tmp_path / "clip"))
    images = clip.images([Image.fromarray(np.full((40, 40, 3), v, np.uint8)) for v in (0, 200)])
    texts = clip.texts(["a red circle", "a blue square", "a red circle"])
    assert images.shape == (2, 384) and texts.shape == (3, 384)
    assert torch.allclose(images.norm(dim=-1), torch.ones(2)) and torch.allclose(texts.norm(dim=-1), torch.ones(3))
    assert torch.equal(texts[0], texts[2]) and not torch.equal(texts[0], texts[1])


def _tiny_dino_sam(tmp_path):
    """Grounding DINO and SAM at tiny random sizes, with processors built offline."""
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
        SwinConfig,
    )

    torch.manual_seed(0)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "red", "circle", "blue"]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    dino = GroundingDinoForObjectDetection(GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, image_size=64,
                                   out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=9, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5, num_feature_levels=3, encoder_n_points=1,
        decoder_n_points=1, max_text_len=16, use_timm_backbone=False))
    dino_processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}), tokenizer=tokenizer)
    sam = SamModel(SamConfig(
        vision_config=SamVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                                      patch_size=16, output_channels=16, mlp_dim=32, global_attn_indexes=[0],
                                      num_pos_feats=8),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
                                                 iou_head_hidden_dim=16)))
    sam_processor = SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": 64},
                                                                   pad_size={"height": 64, "width": 64}))
    return dino_processor, dino, sam_processor, sam


def test_grounding_dino_and_sam_plumbing_on_tiny_random_models(tmp_path):
    from lmm_steer.explain.grounders import DinoSamGrounder, phrase

    assert phrase("A Red circle.") == "a red circle."
    models = _tiny_dino_sam(tmp_path)
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(image)
    every = DinoSamGrounder(models=models, box_threshold=0.0, text_threshold=0.0)
    assert len(every.boxes(Image.open(image).convert("RGB"), "red circle")) > 0
    mask = every.ground("red circle", str(image), (48, 40))
    assert mask.shape == (48, 40) and mask.dtype == bool
    none = DinoSamGrounder(models=models, box_threshold=1.01)
    assert not none.ground("red circle", str(image), (48, 40)).any()
    rows = [{"feature": f, "explanation": "red circle", "top_images": [{"image": str(image), "grid": [[1.0, 0.0], [0.0, 1.0]]}]}
            for f in (1, 2)]
    result = score(rows, None, grounder=every)
    assert set(result["mean"]) == {"iou", "random_iou", "iou_over_random"} and 0 <= result["mean"]["iou"] <= 1


def test_the_background_is_what_no_object_covers_and_is_named_alone(tmp_path):
    ann, image = _coco(tmp_path)
    grid = [[0.0, 0.0], [1.0, 0.0]]  # the bottom-left quarter: neither the circle nor the square
    background = ann.grounded(ann.named("The background."), image, (8, 8))
    assert background.sum() == 16 and not background[:4, :4].any() and not background[:, 4:].any()
    got = feature_ious(ann, "The background", [{"image": image, "grid": grid}], {})
    assert got["iou"] == pytest.approx(1.0, abs=0.07) and got["names_attribute"]
    assert got["attribute"] == [["region", "background"]] and got["ceiling_iou"] == pytest.approx(1.0, abs=0.07)
    # named beside an object, the background is where that object stands, not what is highlighted
    on = ann.grounded(ann.named("a red circle on a background"), image, (8, 8))
    assert on.sum() == 16 and on[:4, :4].all()
    assert feature_ious(ann, "red circle", [{"image": image, "grid": grid}], {})["iou"] == 0.0


def test_the_shipped_scenes_clip_matches_fresh_scenes_with_their_own_captions(tmp_path):
    from lmm_steer.explain.score import ClipScorer

    generate(tmp_path, 8, seed=20261207)  # a split of its own
    captions = [json.loads(line)["caption"] for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    images = [Image.open(tmp_path / f"images/{i:06d}.png").convert("RGB") for i in range(8)]
    clip = ClipScorer("builtin:scenes-clip")
    similarity = clip.images(images) @ clip.texts(captions).T
    own = similarity.diag()
    others = (similarity.sum(1) - own) / 7
    assert (own > others).all() and int((similarity.argmax(1) == torch.arange(8)).sum()) >= 5
