"""The scenes' vision tower: transformers' CLIP vision architecture with its projection, trained
contrastively on scene images against a frozen real text encoder (all-MiniLM-L6-v2, whose
sentence embeddings are the text side; only the image side learns). Kept with its projection it
is a CLIP model of this domain: image-text similarity for scoring explanations, and (without the
projection) the vision tower of the scenes LMM.

The loss is CLIP's symmetric InfoNCE with a learned temperature; captions describe whole scenes
and highlighted regions, so the tower learns objects' colour, shape and size and where they are.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from ..training.trainer import warmup_cosine


@dataclass
class VisionConfig:
    image_size: int = 128
    patch_size: int = 16
    hidden_size: int = 192
    layers: int = 4
    heads: int = 3
    intermediate_size: int = 768
    projection_dim: int = 384  # all-MiniLM-L6-v2's embedding size
    batch: int = 128
    steps: int = 1000
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.05
    seed: int = 0


def build_vision_tower(cfg: VisionConfig):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(cfg.seed)
    config = CLIPVisionConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
                              num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                              intermediate_size=cfg.intermediate_size, projection_dim=cfg.projection_dim)
    return CLIPVisionModelWithProjection(config)


def image_processor(size: int):
    """CLIP's own image processor (resize, crop, normalise) at ``size`` px."""
    from ..models.builtin import family_image_processor

    return family_image_processor("clip", "CLIPImageProcessor", size={"shortest_edge": size},
                                  crop_size={"height": size, "width": size})


def pixel_values(paths: list[str], size: int) -> torch.Tensor:
    """``[N, 3, size, size]`` through ``image_processor``."""
    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    return image_processor(size)(images, return_tensors="pt")["pixel_values"]


def image_embeddings(model, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Unit-length projected embeddings ``[N, projection_dim]``."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch):
            out.append(F.normalize(model(pixel_values=pixels[i:i + batch]).image_embeds, dim=-1))
    return torch.cat(out)


def retrieval_accuracy(model, pixels: torch.Tensor, text: torch.Tensor) -> float:
    """Share of images whose own caption is the nearest of all captions (image -> text top-1).
    Identical captions count as a hit for either image."""
    sims = image_embeddings(model, pixels) @ text.T
    best = sims.argmax(1)
    return float((text[best] == text).all(1).float().mean())


def train_vision_tower(pixels: torch.Tensor, text: torch.Tensor, cfg: VisionConfig, progress=None):
    """Train on images ``pixels`` [N, 3, S, S] paired with frozen unit-length caption embeddings
    ``text`` [N, projection_dim]. Returns the model and its per-step log."""
    model = build_vision_tower(cfg)
    model.train()
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": [*no_decay, logit_scale], "weight_decay": 0.0}], lr=cfg.lr)

    order, rng, at = list(range(len(pixels))), random.Random(cfg.seed), len(pixels)
    log = []
    for step in range(cfg.steps):
        if at + cfg.batch > len(order):
            rng.shuffle(order)
            at = 0
        rows = torch.tensor(order[at:at + cfg.batch])
        at += cfg.batch
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps)
        img = F.normalize(model(pixel_values=pixels[rows]).image_embeds, dim=-1)
        txt = text[rows]
        logits = logit_scale.exp().clamp(max=100) * img @ txt.T
        # captions can repeat within a batch ("A small red circle."): every equal caption is a target
        same = (txt @ txt.T) > 1 - 1e-6
        targets = same.float() / same.float().sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.append({"step": step + 1, "loss": loss.item(), "temperature": 1 / logit_scale.exp().item()})
        if progress:
            progress(log[-1])
    model.eval()
    return model, log
