"""``lmm-steer scenes train``: the scenes LMM from scratch, in three stages, resumable.

1. The vision tower learns contrastively against frozen MiniLM caption embeddings
   (``vision.train_vision_tower``); it is kept with its projection as the domain's CLIP model.
2. Grounding: the tower and LLaVA-NeXT's projector learn to put SmolLM2's own input embedding of
   an object's words (" red circle") on the patches it covers, so the image tokens start out as
   something the language model can read. No language-model pass: minutes.
3. LLaVA-NeXT = tower + projector + SmolLM2-135M-Instruct, trained on the scene conversations with
   the loss on answer tokens only; by default only a low-rank delta of every linear layer of the
   language model learns (SmolLM2 itself stays frozen). A scene's questions are packed into one
   multi-turn conversation ending with its caption, so its 336 image tokens are paid once per
   scene; the format hint ("Answer in a word or a short phrase.") is kept on the first turn only,
   the turn that is served. The forward pass runs under bfloat16 autocast where the CPU has
   AVX-512 (1.75x faster on 2 such cores) and in float32 on AVX2-only CPUs (22x faster there than
   emulated bfloat16); ``precision`` overrides. The trained parameters and the optimiser stay float32.

Stage 3 saves a checkpoint (trained tensors and AdamW state, safetensors; step and elapsed time,
JSON) every ``checkpoint_every`` steps; a run started again with the same ``--out`` resumes from
it, and the batches of a step depend only on (seed, step), so a resumed run sees the same data.

With ``budget_minutes``, the run's wall clock (every invocation's, kept in ``wall.json``) is held to
the budget: stage 3 measures its pace and, from the end of warm-up on, shortens its schedule to the
steps that fit (never lengthens it), so a slower machine trains fewer steps instead of running over.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections import defaultdict, deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..models.scenes_llava_next import ARCHITECTURE, apply_trained, build_untrained, read_weights
from ..training.trainer import warmup_cosine
from .generate import FORMAT_HINT, binding_negatives, exist_question
from .vision import VisionConfig, pixel_values, train_vision_tower

LOW_RANK_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAINED_FILE = "scenes-llava-next.safetensors"
CAPTION_QUESTION = "Describe the image."


@dataclass
class SceneTrainConfig:
    # stage 1: the vision tower, contrastive
    clip_steps: int = 600
    clip_batch: int = 128
    clip_lr: float = 1e-3
    # stage 3: the LMM
    steps: int = 700  # runs 10-12's; under --budget-minutes 120, run 12 trained 578 of them (docs/scenes.md)
    batch: int = 3  # conversations per step
    turns: int = 8  # most questions packed into one scene's conversation (its caption comes last)
    region_share: float = 0.2  # share of conversations that are one highlighted-region question
    rank: int = 8
    # After grounding, the tower and projector stay where grounding left them (rate 0) and only the
    # language model's delta learns to read them. Letting the projector learn on answers at 1e-3
    # undid the grounding within 150 steps (image tokens grew to norm 36 against text's 2.9).
    lr: float = 0.0  # projector and image newline
    lora_lr: float = 1e-3
    vision_lr: float = 0.0
    warmup: int = 50
    # the language model's delta starts learning at this step; with an unfrozen projector, a later
    # start leaves the answers improvable only through the image for a while
    low_rank_from: int = 0
    # stage 1.5: the tower and projector learn to put, on each patch an object covers, SmolLM2's own
    # input embedding of the object's colour and shape words, and to classify each patch's shape and
    # colour (heads dropped afterwards); shape only starts to be learned after some 500 steps
    ground_steps: int = 5000
    ground_batch: int = 64
    ground_vision_lr: float = 1e-3
    ground_lr: float = 1e-3  # projector
    ground_head_lr: float = 1e-2
    # share of grounding steps on one random 128 px tile of the 2x upscaled scene, as AnyRes's tiles
    # show it (0: the base view only, as run F was grounded; the tiles' scale is then unseen there)
    ground_tile_share: float = 0.5
    seed: int = 0
    checkpoint_every: int = 50
    # fine-tuning: start from a trained file (`scenes-llava-next.safetensors`: tower, projector and
    # delta), skipping stages 1 and 2 ("" trains from scratch)
    init: str = ""
    # share of conversations that are one feature-style highlight (`sae highlights`), for training an
    # explainer that can also answer "background" and "unable"; 0 draws exactly what it did before
    highlight_share: float = 0.0
    # the whole run's wall clock in minutes (0: no budget); stage 3 trains the steps that fit
    budget_minutes: float = 0.0
    # pairs of existence turns added to each scene conversation: a "no" to a colour and a shape that
    # are both in the scene but on different objects (``binding_negatives``) and a "yes" to an object
    # that is there. Runs 10 and 11 (0) answered "yes" to such pairs: most of their easy existence errors
    binding_turns: int = 1
    # stage 3's forward pass (stage 3 runs on the CPU): "bf16" (autocast), "fp32", or "auto": bf16 on
    # CPUs with AVX-512 (1.75x faster there), fp32 elsewhere (an AVX2-only CPU has no fast bf16 kernels: a step
    # took 59.5 s under bf16 against 2.7 s in fp32)
    precision: str = "auto"


PRECISIONS = ("auto", "bf16", "fp32")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype stage 3's forward runs under on the CPU (None: no autocast, float32) for ``precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


# seconds the budget keeps back after stage 3's last step: the final save, the process's start and exit
BUDGET_RESERVE_S = 60.0


class WallClock:
    """The run's wall clock across invocations: ``wall.json`` holds what earlier ones spent, updated at
    every stage's end and checkpoint (a killed invocation loses at most its time since the last)."""

    def __init__(self, out: Path):
        self.path = out / "wall.json"
        self.before = json.loads(self.path.read_text())["seconds"] if self.path.exists() else 0.0
        self.started = time.monotonic()

    def seconds(self) -> float:
        return self.before + time.monotonic() - self.started

    def save(self) -> None:
        self.path.write_text(json.dumps({"seconds": round(self.seconds(), 1)}))


def steps_within_budget(step: int, total: int, pace_s: float, left_s: float) -> int:
    """The schedule's new length: the steps done plus those that fit in ``left_s`` at ``pace_s`` a
    step, never more than ``total`` (a budget only shortens) and never fewer than ``step``."""
    fit = step + int(max(left_s, 0.0) // pace_s) if pace_s > 0 else total
    return max(step, min(total, fit))


class LowRankLinear(nn.Module):
    """``base(x) + x A^T B^T``: a frozen linear layer plus a trainable rank-r delta. B starts at zero,
    so training starts from the unchanged language model."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.A.T.to(x.dtype)) @ self.B.T.to(x.dtype)


def add_low_rank(model: nn.Module, prefix: str, rank: int) -> dict[str, LowRankLinear]:
    """Wrap the targeted linear layers under ``prefix``; keyed by the plain model's module name."""
    wrapped = {}
    root = model.get_submodule(prefix)
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in LOW_RANK_TARGETS and isinstance(child, nn.Linear):
                setattr(module, child_name, LowRankLinear(child, rank))
                wrapped[".".join(p for p in (prefix, name, child_name) if p)] = getattr(module, child_name)
    return wrapped


class SceneConversations:
    """A ``scenes generate`` directory as training conversations."""

    def __init__(self, root: Path):
        self.root = Path(root)
        by_image = defaultdict(list)
        for line in (self.root / "conversations.jsonl").read_text().splitlines():
            row = json.loads(line)
            by_image[row["image"]].append((_question(row), row["conversations"][1]["value"]))
        self.scenes = sorted(by_image.items())
        self.captions = {r["image"]: r["caption"]
                         for r in map(json.loads, (self.root / "captions.jsonl").read_text().splitlines())}
        self.regions = self._single_questions("regions.jsonl")
        graphs = json.loads((self.root / "scenes.json").read_text())["scenes"] if (self.root / "scenes.json").exists() else []
        self.objects = {g["file"]: [(o["colour"], o["shape"]) for o in g["objects"]] for g in graphs}
        self.highlights = self._single_questions("highlights.jsonl")
        if not self.scenes:
            raise ValueError(f"{self.root}: no conversations")

    def _single_questions(self, name: str) -> list:
        path = self.root / name
        if not path.exists():
            return []
        return [(r["image"], [(_question(r), r["conversations"][1]["value"])])
                for r in map(json.loads, path.read_text().splitlines())]

    def sample(self, rng: random.Random, turns: int, region_share: float, highlight_share: float = 0.0,
               binding_turns: int = 0):
        """One conversation: (image path, [(question, answer), ...]). A scene's ends with its caption,
        every object's size, colour and shape in one answer: dense supervision of what the image
        tokens must carry. ``binding_turns`` pairs of existence turns (see ``SceneTrainConfig``) go in
        at random places, the first turn included."""
        if highlight_share > 0:  # no draw otherwise, so runs without highlights see what they always did
            if not self.highlights:
                raise ValueError(f"{self.root}: no highlights.jsonl (make it with `sae highlights`)")
            if rng.random() < highlight_share:
                return self.highlights[rng.randrange(len(self.highlights))]
        if self.regions and rng.random() < region_share:
            return self.regions[rng.randrange(len(self.regions))]
        image, qa = self.scenes[rng.randrange(len(self.scenes))]
        picked = rng.sample(qa, min(turns, len(qa)))
        if binding_turns > 0:  # no draw otherwise, so runs without them see what they always did
            picked = self._with_binding(rng, image, picked, binding_turns)
        return image, picked + [(CAPTION_QUESTION, self.captions[image])]

    def _with_binding(self, rng: random.Random, image: str, picked: list, pairs: int) -> list:
        if image not in self.objects:
            raise ValueError(f"{self.root}: no scenes.json entry for {image} (binding turns need the scene graph)")
        objects = self.objects[image]
        negatives = binding_negatives(objects)
        picked = list(picked)
        for _ in range(pairs if negatives else 0):  # a one-colour or one-shape scene has none
            extra = [(exist_question(*rng.choice(negatives)) + FORMAT_HINT, "no"),
                     (exist_question(*rng.choice(objects)) + FORMAT_HINT, "yes")]
            for turn in extra:
                picked.insert(rng.randrange(len(picked) + 1), turn)
        return picked


def _question(row) -> str:
    return row["conversations"][0]["value"].removeprefix("<image>\n")


def messages(qa: list[tuple[str, str]]) -> list[dict]:
    out = []
    for i, (question, answer) in enumerate(qa):
        if i:
            question = question.removesuffix(FORMAT_HINT)
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": question}]
        out += [{"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return out


def answer_mask(input_ids: torch.Tensor, tok) -> torch.Tensor:
    """True on each assistant answer's tokens and its closing ``<|im_end|>``."""
    opener = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for b, row in enumerate(input_ids.tolist()):
        i, inside = 0, False
        while i < len(row):
            if not inside and row[i:i + len(opener)] == opener:
                inside, i = True, i + len(opener)
                continue
            if inside:
                mask[b, i] = True
                inside = row[i] != end
            i += 1
    return mask


def encode(processor, conversations, root: Path):
    texts = [processor.apply_chat_template(messages(qa), tokenize=False) for _, qa in conversations]
    images = []
    for image, _ in conversations:
        with Image.open(root / image) as im:
            images.append(im.convert("RGB"))
    processor.tokenizer.padding_side = "right"
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    batch["labels_mask"] = answer_mask(batch["input_ids"], processor.tokenizer) & batch["attention_mask"].bool()
    return batch


def answer_loss(model, batch) -> torch.Tensor:
    """Cross-entropy of the answer tokens; the vocabulary projection runs on those positions only.

    No attention mask goes in: ``encode`` pads on the right, so under causal attention no real token
    sees a pad, and the pads' own outputs are outside the loss. The same loss to 5 digits, and a step
    about 12% faster on 2 cores (SDPA takes its causal path instead of a dense masked one)."""
    hidden = model.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]).last_hidden_state
    targets = batch["labels_mask"][:, 1:]
    logits = model.lm_head(hidden[:, :-1][targets])
    return F.cross_entropy(logits.float(), batch["input_ids"][:, 1:][targets])


def _rss_gb() -> float | None:
    """The process's resident memory now (Linux), logged beside the pace. The LMM stage slows by about a
    fifth as it goes; in run 12 the memory grew fastest early and did not follow the slowdown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**30, 2)


def _log(out: Path, row: dict, progress) -> None:
    with open(out / "train_log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    if progress:
        progress(row)


def train_clip(data: SceneConversations, cfg: SceneTrainConfig, out: Path, progress=None):
    """Stage 1; skipped when ``out/clip`` exists (a resumed run)."""
    from transformers import CLIPVisionModelWithProjection

    from ..concepts.embedder import default_embedder

    if (out / "clip" / "config.json").exists():
        return CLIPVisionModelWithProjection.from_pretrained(out / "clip")
    captions = [json.loads(line) for line in (data.root / "captions.jsonl").read_text().splitlines()]
    pairs = [(r["image"], r["caption"]) for r in captions] + [(img, qa[0][1]) for img, qa in data.regions]
    pixels = pixel_values([str(data.root / img) for img, _ in pairs], ARCHITECTURE["image_size"])
    text = default_embedder().encode([caption for _, caption in pairs])
    vcfg = VisionConfig(batch=cfg.clip_batch, steps=cfg.clip_steps, lr=cfg.clip_lr, seed=cfg.seed)
    started = time.monotonic()
    model, log = train_vision_tower(pixels, text, vcfg, progress=lambda r: r["step"] % 50 or _log(
        out, {"stage": "clip", **r, "elapsed_s": round(time.monotonic() - started, 1)}, progress))
    model.save_pretrained(out / "clip")
    (out / "clip" / "stage.json").write_text(json.dumps({"seconds": round(time.monotonic() - started, 1),
                                                          "pairs": len(pairs), "final_loss": log[-1]["loss"] if log else None}))
    return model


GROUND_MIN_SHARE = 0.25  # a patch is an object's when it covers this much of it: small objects then show


def patch_objects(data: SceneConversations, grid: int) -> dict[str, list[tuple[str, str] | None]]:
    """Per scene image: for each base-view patch (row-major), the (colour, shape) of the object that
    covers most of it, when that object covers at least ``GROUND_MIN_SHARE``; None for background."""
    import numpy as np

    from .generate import patch_shares, rle_decode

    coco = json.loads((data.root / "annotations.json").read_text())
    shapes = {c["id"]: c["name"] for c in coco["categories"]}
    files = {img["id"]: img["file_name"] for img in coco["images"]}
    best = {f: np.zeros(grid * grid) for f in files.values()}
    out = {f: [None] * (grid * grid) for f in files.values()}
    for ann in coco["annotations"]:
        f = files[ann["image_id"]]
        share = patch_shares(rle_decode(ann["segmentation"]), grid, grid)
        for i in np.flatnonzero((share > best[f]) & (share >= GROUND_MIN_SHARE)):
            out[f][i] = (ann["attributes"]["colour"], shapes[ann["category_id"]])
        best[f] = np.maximum(best[f], share)
    return out


def patch_words(objects: dict[str, list[tuple[str, str] | None]], tok) -> dict[str, list[list[int]]]:
    """From ``patch_objects``: per scene image and patch, the token ids of its object's colour and
    shape (" red circle"), or of " background"."""
    background = tok.encode(" background", add_special_tokens=False)
    return {f: [tok.encode(f" {o[0]} {o[1]}", add_special_tokens=False) if o else background for o in objs]
            for f, objs in objects.items()}


def patch_classes(objects: dict[str, list[tuple[str, str] | None]]) -> dict[str, torch.Tensor]:
    """From ``patch_objects``: per scene image, ``[patches, 2]`` class ids of each patch's shape
    (-100 on background, so cross-entropy skips it) and colour (``len(COLOURS)`` on background)."""
    from .generate import COLOURS, SHAPES

    colours = list(COLOURS)
    return {f: torch.tensor([[SHAPES.index(o[1]), colours.index(o[0])] if o else [-100, len(colours)] for o in objs])
            for f, objs in objects.items()}


def dihedral(k: int, images: torch.Tensor, *grids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One of the 8 flips and quarter turns, ``k`` in 0..7, applied alike to images ``[B, C, S, S]``
    and patch grids ``[B, G, G, ...]``; an object keeps its colour and shape under all of them."""
    if k >= 4:
        images, grids = images.flip(-1), tuple(g.flip(2) for g in grids)
    return images.rot90(k % 4, (-2, -1)), *(g.rot90(k % 4, (1, 2)) for g in grids)


def quadrant(q: int, images: torch.Tensor, *grids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Quadrant ``q`` (0..3, row-major) of images ``[B, C, 2S, 2S]`` and of patch grids
    ``[B, 2G, 2G, ...]``: one AnyRes tile of a 2x upscaled scene and its patches' labels."""
    r, c = divmod(q, 2)
    s, g = images.shape[-1] // 2, grids[0].shape[1] // 2 if grids else 0
    return (images[..., r * s:(r + 1) * s, c * s:(c + 1) * s],
            *(x[:, r * g:(r + 1) * g, c * g:(c + 1) * g] for x in grids))


def train_grounding(model, tok, data: SceneConversations, cfg: SceneTrainConfig, out: Path, progress=None) -> None:
    """Stage 1.5; its result is kept in ``out/grounding.safetensors`` and reused on resume.

    The projector learns to put on each patch the mean of SmolLM2's input embeddings of its object's
    words (" red circle"), by squared error relative to the target's norm, so direction and scale
    both match text. Contrastive training leaves shape out of the tower's patches (a linear probe
    of the shape of an object from them scores 0.19 on held-out scenes, chance being 0.14), so the
    tower also learns, through linear heads dropped afterwards, to classify each patch's shape and
    colour; the images are flipped and turned at random, since the tower overfits 6,000 scenes."""
    from safetensors.torch import load_file, save_file

    inner = model.model
    params = [*inner.vision_tower.parameters(), *inner.multi_modal_projector.parameters()]
    names = {id(p): n for n, p in model.named_parameters()}
    if (out / "grounding.safetensors").exists():
        state = load_file(str(out / "grounding.safetensors"))
        with torch.no_grad():
            for p in params:
                p.copy_(state[names[id(p)]])
        return
    from .generate import COLOURS, SHAPES

    side, patch = ARCHITECTURE["image_size"], ARCHITECTURE["patch_size"]
    embed = inner.language_model.embed_tokens.weight.detach()

    def view(scale: int):
        """Pixels, regression targets and class labels of the scenes seen at ``scale`` x their size."""
        grid = scale * side // patch
        objects = patch_objects(data, grid)
        words, classes = patch_words(objects, tok), patch_classes(objects)
        files = sorted(objects)
        pixels = pixel_values([str(data.root / f) for f in files], scale * side)
        # [scenes, grid, grid, ...]: laid out as the image, so flips and turns move them with it
        target = torch.stack([torch.stack([embed[ids].mean(0) for ids in words[f]]) for f in files])
        labels = torch.stack([classes[f] for f in files])
        return pixels, target.unflatten(1, (grid, grid)), labels.unflatten(1, (grid, grid))

    base = view(1)
    scenes = len(base[0])
    # the 2x view kept in half precision: 6,000 scenes at 256 px take 2.4 GB even so
    tiles = [x.half() if x.is_floating_point() else x for x in view(2)] if cfg.ground_tile_share > 0 else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        heads = nn.Linear(inner.vision_tower.config.hidden_size, len(SHAPES) + len(COLOURS) + 1)
    started = time.monotonic()
    rates = [cfg.ground_vision_lr, cfg.ground_lr, cfg.ground_head_lr]
    opt = torch.optim.AdamW([{"params": list(inner.vision_tower.parameters()), "lr": rates[0]},
                             {"params": list(inner.multi_modal_projector.parameters()), "lr": rates[1]},
                             {"params": list(heads.parameters()), "lr": rates[2]}], weight_decay=0.0)
    rng = random.Random(f"{cfg.seed}:ground")
    for p in params:
        p.requires_grad_(True)
    for step in range(cfg.ground_steps):
        rows = torch.tensor([rng.randrange(scenes) for _ in range(cfg.ground_batch)])
        if tiles is not None and rng.random() < cfg.ground_tile_share:
            pixels, target, labels = quadrant(rng.randrange(4), *(x[rows].float() if x.is_floating_point()
                                                                 else x[rows] for x in tiles))
        else:
            pixels, target, labels = (x[rows] for x in base)
        images, want, ids = dihedral(rng.randrange(8), pixels, target, labels)
        want, ids = want.flatten(1, 2), ids.flatten(1, 2)
        shape_id, colour_id = ids[..., 0], ids[..., 1]
        for group, rate in zip(opt.param_groups, rates, strict=True):
            group["lr"] = warmup_cosine(step, rate, cfg.warmup, cfg.ground_steps)
        hidden = inner.vision_tower(pixel_values=images, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = inner.multi_modal_projector(hidden)
        regression = ((got - want).pow(2).sum(-1) / want.pow(2).sum(-1)).mean()
        logits = heads(hidden)
        shape_loss = F.cross_entropy(logits[..., :len(SHAPES)].flatten(0, 1), shape_id.flatten())
        colour_loss = F.cross_entropy(logits[..., len(SHAPES):].flatten(0, 1), colour_id.flatten())
        loss = regression + shape_loss + colour_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 25 == 0:
            _log(out, {"stage": "ground", "step": step + 1, "loss": round(regression.item(), 4),
                       "shape_loss": round(shape_loss.item(), 4), "colour_loss": round(colour_loss.item(), 4),
                       "elapsed_s": round(time.monotonic() - started, 1)}, progress)
    save_file({names[id(p)]: p.detach().clone().contiguous() for p in params}, str(out / "grounding.safetensors"),
              metadata={"seconds": str(round(time.monotonic() - started, 1))})


def _trainable(model, wrapped) -> dict[str, list]:
    inner = model.model
    return {
        "vision": list(inner.vision_tower.parameters()),
        "projector": [*inner.multi_modal_projector.parameters(), inner.image_newline],
        "low_rank": [p for layer in wrapped.values() for p in (layer.A, layer.B)],
    }


def trained_state(model, wrapped) -> dict[str, torch.Tensor]:
    """What training changed, under the names ``models.scenes_llava_next.apply_trained`` reads."""
    state = {}
    for name, param in model.named_parameters():
        if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")) or name == "model.image_newline":
            state[name] = param.detach().clone().contiguous()
    for linear, layer in wrapped.items():
        state[f"{linear}.lora_A"] = layer.A.detach().clone().contiguous()
        state[f"{linear}.lora_B"] = layer.B.detach().clone().contiguous()
    return state


def _save_checkpoint(out: Path, model, wrapped, opt, step: int, elapsed: float, steps: int) -> None:
    from safetensors.torch import save_file

    state = {f"param/{k}": v for k, v in trained_state(model, wrapped).items()}
    names = {id(p): n for n, p in _named_trainable(model, wrapped)}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value):
                    state[f"adam/{names[id(p)]}/{key}"] = value.detach().clone().contiguous()
    tmp = out / "checkpoint.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(out / "checkpoint.safetensors")
    (out / "checkpoint.json").write_text(json.dumps({"step": step, "elapsed_s": round(elapsed, 1), "steps": steps}))


def _named_trainable(model, wrapped):
    groups = _trainable(model, wrapped)
    by_id = {id(p): n for n, p in model.named_parameters()}
    low_rank_names = {}
    for linear, layer in wrapped.items():
        low_rank_names[id(layer.A)] = f"{linear}.lora_A"
        low_rank_names[id(layer.B)] = f"{linear}.lora_B"
    for params in groups.values():
        for p in params:
            yield low_rank_names.get(id(p), by_id.get(id(p))), p


def _load_checkpoint(out: Path, model, wrapped, opt) -> tuple[int, float, int | None]:
    """Restores the trained tensors and AdamW state; returns the step, the stage's seconds and the
    schedule's length as last decided (None in checkpoints from before budgets)."""
    from safetensors.torch import load_file

    meta = json.loads((out / "checkpoint.json").read_text())
    state = load_file(str(out / "checkpoint.safetensors"))
    params = dict(_named_trainable(model, wrapped))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[f"param/{name}"])
    optimised = {id(p) for group in opt.param_groups for p in group["params"]}
    for name, p in params.items():
        keys = {k.rsplit("/", 1)[1]: v for k, v in state.items() if k.startswith(f"adam/{name}/")}
        if keys and id(p) in optimised:
            opt.state[p] = keys
    return meta["step"], meta["elapsed_s"], meta.get("steps")


def train_scenes_lmm(data_dir: Path, out: Path, cfg: SceneTrainConfig, progress=None) -> dict:
    """All stages; returns a summary. ``out`` holds the CLIP model, the checkpoint, the log and, at
    the end, ``scenes-llava-next.safetensors``."""
    from safetensors.torch import save_file

    rates = {"vision": cfg.vision_lr, "projector": cfg.lr, "low_rank": cfg.lora_lr}
    if not any(rate > 0 for rate in rates.values()):
        raise ValueError("every learning rate of the LMM stage is 0: nothing to train")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    wall = WallClock(out)
    data = SceneConversations(data_dir)
    if cfg.init:
        init_state, architecture = read_weights(Path(cfg.init))
        loaded = build_untrained(architecture, seed=cfg.seed)
        apply_trained(loaded.model, {k: v.float() for k, v in init_state.items()
                                     if not k.endswith((".lora_A", ".lora_B"))})
    else:
        architecture = ARCHITECTURE
        clip = train_clip(data, cfg, out, progress)
        wall.save()
        loaded = build_untrained(architecture, seed=cfg.seed)
        tower = loaded.model.model.vision_tower
        # transformers builds LLaVA's tower as CLIPVisionModel (``vision_model.*``) or, in some 5.x
        # releases, as the bare transformer; either way it is the CLIP model's ``vision_model``
        target = tower.vision_model if hasattr(tower, "vision_model") else tower
        target.load_state_dict(clip.vision_model.state_dict())
        for p in loaded.model.parameters():
            p.requires_grad_(False)
        train_grounding(loaded.model, loaded.tokenizer, data, cfg, out, progress)
        wall.save()
    model, processor = loaded.model, loaded.processor
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        wrapped = add_low_rank(model, "model.language_model", cfg.rank)
    if cfg.init:  # the delta goes on learning from where the file left it (not merged)
        with torch.no_grad():
            for linear, layer in wrapped.items():
                layer.A.copy_(init_state[f"{linear}.lora_A"].float())
                layer.B.copy_(init_state[f"{linear}.lora_B"].float())
    # a part whose rate is 0 stays frozen: no gradient through it (run F spent time back-propagating
    # into the tower it never changed), no optimiser state, no share of the clipped norm
    groups = {k: ps for k, ps in _trainable(model, wrapped).items() if rates[k] > 0}
    for params in groups.values():
        for p in params:
            p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": ps, "lr": rates[k], "name": k, "weight_decay": 0.0}
                             for k, ps in groups.items()])
    step, elapsed, steps = 0, 0.0, cfg.steps
    if (out / "checkpoint.json").exists():
        step, elapsed, budgeted = _load_checkpoint(out, model, wrapped, opt)
        if cfg.budget_minutes > 0 and budgeted:
            steps = min(steps, budgeted)
    model.train()
    half = autocast_dtype(cfg.precision)
    started = time.monotonic() - elapsed
    # the pace is the mean of this invocation's recent steps (run 10's slowed from 5.1 s to 6.4 s)
    recent = deque([(step, time.monotonic())], maxlen=cfg.checkpoint_every + 1)
    while step < steps:
        rng = random.Random(f"{cfg.seed}:{step}")
        batch = encode(processor, [data.sample(rng, cfg.turns, cfg.region_share, cfg.highlight_share, cfg.binding_turns)
                                   for _ in range(cfg.batch)], data.root)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, rates[group["name"]], cfg.warmup, steps)
            if group["name"] == "low_rank" and step < cfg.low_rank_from:
                group["lr"] = 0.0
        with torch.autocast("cpu", dtype=half or torch.bfloat16, enabled=half is not None):
            loss = answer_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for ps in groups.values() for p in ps], 1.0)
        opt.step()
        step += 1
        recent.append((step, time.monotonic()))
        # decided once warm-up is over (the cosine has not begun to fall) and again at each checkpoint
        if cfg.budget_minutes > 0 and step >= cfg.warmup and (step == cfg.warmup or step % cfg.checkpoint_every == 0):
            pace = (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])
            left = cfg.budget_minutes * 60 - BUDGET_RESERVE_S - wall.seconds()
            if (shortened := steps_within_budget(step, steps, pace, left)) < steps:
                steps = shortened
                _log(out, {"stage": "lmm", "step": step, "budget_steps": steps, "pace_s": round(pace, 2),
                           "wall_s": round(wall.seconds(), 1)}, progress)
        if step % 10 == 0 or step == steps:
            _log(out, {"stage": "lmm", "step": step, "loss": round(loss.item(), 4),
                       "answers": int(batch["labels_mask"].sum()),
                       "elapsed_s": round(time.monotonic() - started, 1), "rss_gb": _rss_gb()}, progress)
        if step % cfg.checkpoint_every == 0 or step == steps:
            _save_checkpoint(out, model, wrapped, opt, step, time.monotonic() - started, steps)
            wall.save()
    total = time.monotonic() - started
    clip_seconds = None if cfg.init else json.loads((out / "clip" / "stage.json").read_text())["seconds"]
    summary = {"steps": steps, "lmm_seconds": round(total, 1), "clip_seconds": clip_seconds,
               "data": str(data_dir), "scenes": len(data.scenes), "regions": len(data.regions),
               "highlights": len(data.highlights), "wall_seconds": round(wall.seconds(), 1),
               "forward_dtype": str(half or torch.float32).removeprefix("torch.")}
    metadata = {"architecture": json.dumps(architecture), "config": json.dumps(asdict(cfg)),
                "summary": json.dumps(summary)}
    save_file(trained_state(model, wrapped), str(out / TRAINED_FILE), metadata=metadata)
    wall.save()
    return summary


def print_progress(row: dict) -> None:
    print(json.dumps(row), file=sys.stderr, flush=True)
