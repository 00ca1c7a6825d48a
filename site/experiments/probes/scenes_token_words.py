"""Probe for issue #16: which object does each grounded image token name, and does seeing the scene
upscaled (AnyRes's 2 x 2 tiles of the 256 px scene) help small objects?

For every annotated object of a scenes split, the projected image tokens of the patches it covers are
averaged (weighted by the share of each patch it covers) and compared, by cosine, with SmolLM2's
input embeddings of the 8 colour words and the 7 shape words; the nearest of each is right or not.
Twice: on the base view's 8 x 8 patches, and on the 16 x 16 patches of the 2x upscaled scene cut
into four 128 px tiles, each through the same tower and projector.

    python experiments/probes/scenes_token_words.py RUN_DIR/grounding.safetensors DATA_DIR
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmm_steer.models.scenes_llava_next import ARCHITECTURE, build_untrained
from lmm_steer.scenes.generate import COLOURS, SHAPES, patch_shares, rle_decode
from lmm_steer.scenes.vision import pixel_values


def main(weights: str, data: str) -> None:
    loaded = build_untrained(ARCHITECTURE, seed=0)
    params = dict(loaded.model.named_parameters())
    with torch.no_grad():
        for k, v in load_file(weights).items():
            params[k].copy_(v)
    inner, tok = loaded.model.model, loaded.tokenizer
    embed = inner.language_model.embed_tokens.weight.detach()

    def word(w):
        return embed[tok.encode(" " + w, add_special_tokens=False)].mean(0)

    colour_words = torch.stack([word(c) for c in COLOURS])
    shape_words = torch.stack([word(s) for s in SHAPES])
    coco = json.load(open(f"{data}/annotations.json"))
    shape_of = {c["id"]: c["name"] for c in coco["categories"]}
    file_of = {i["id"]: i["file_name"] for i in coco["images"]}
    files = sorted(set(file_of.values()))
    index = {f: i for i, f in enumerate(files)}

    @torch.no_grad()
    def tokens(pixels):
        hidden = inner.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        return inner.multi_modal_projector(hidden)

    side = ARCHITECTURE["image_size"]
    base = tokens(pixel_values([f"{data}/{f}" for f in files], side))
    big = pixel_values([f"{data}/{f}" for f in files], 2 * side)
    quads = [(r, c) for r in range(2) for c in range(2)]
    tiles = tokens(torch.cat([big[:, :, r * side:(r + 1) * side, c * side:(c + 1) * side] for r, c in quads]))
    g = side // ARCHITECTURE["patch_size"]
    tiles = tiles.reshape(4, len(files), g, g, -1)
    fine = torch.zeros(len(files), 2 * g, 2 * g, tiles.shape[-1])
    for k, (r, c) in enumerate(quads):
        fine[:, r * g:(r + 1) * g, c * g:(c + 1) * g] = tiles[k]
    for name, toks, grid in [("base view, 8 x 8", base, g), ("2x tiles, 16 x 16", fine.reshape(len(files), -1, fine.shape[-1]), 2 * g)]:
        tally: dict[str, list[int]] = {}
        for a in coco["annotations"]:
            share = torch.tensor(patch_shares(rle_decode(a["segmentation"]), grid, grid), dtype=torch.float32)
            if share.sum() == 0:
                continue
            v = (toks[index[file_of[a["image_id"]]]] * share[:, None]).sum(0, keepdim=True) / share.sum()
            colour_ok = F.cosine_similarity(v, colour_words).argmax().item() == list(COLOURS).index(a["attributes"]["colour"])
            shape_ok = F.cosine_similarity(v, shape_words).argmax().item() == SHAPES.index(shape_of[a["category_id"]])
            for key in ("all", a["attributes"]["size"]):
                t = tally.setdefault(key, [0, 0, 0])
                t[0], t[1], t[2] = t[0] + colour_ok, t[1] + shape_ok, t[2] + 1
        for key in ("all", "small", "medium", "large"):
            c, s, n = tally[key]
            print(f"| {name} | {key} | {n} | {c / n:.3f} | {s / n:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
