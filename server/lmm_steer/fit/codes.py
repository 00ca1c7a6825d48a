"""Each example's SAE codes at the hook block, pooled over the image's positions and over the
question's, and at the prompt's final position (where the model reads out its answer), and the
block's mean output over the image (for the difference-of-means control).

Pooling leaves out the first position (the attention sink, whose block output is off the SAE's
distribution) and special tokens (the chat template's)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..engine import GenerationRequest, SamplingParams
from ..engine.hookpoint import capture_block_output, resolve_layer_index
from ..engine.inspect import special_ids
from ..engine.prefill import image_token_id
from ..scenes.evaluate import batch_inputs

POOLS = ("image", "text", "last")  # "last": the final prompt position, where the answer is read out


def request(root: Path, item: dict, steering=None, max_tokens: int = 10, system: str | None = None) -> GenerationRequest:
    """The single-turn, greedy request ``item`` is asked as (``system``: a system prompt first)."""
    with Image.open(root / item["image"]) as im:
        image = im.convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["question"]}]}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return GenerationRequest(messages=messages, images=[image], steering=steering,
                             sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0))


@torch.inference_mode()
def batched_answers(engine, root: Path, items: list[dict], batch: int = 16, max_tokens: int = 6, *,
                    on_prefill=None, add_on_image: torch.Tensor | None = None, progress=None) -> list[str]:
    """Greedy answers, batched and left-padded (as ``scenes eval`` answers), through the model
    itself rather than the engine: ``on_prefill(hidden [B, T, D], inputs)`` sees the hook block's
    prefill output; ``add_on_image`` (a vector [D]) is added to it at every image position (the
    difference-of-means control, which no SAE edit can express)."""
    from ..engine.hookpoint import block_hidden, language_model, with_block_hidden

    loaded = engine.loaded
    model = loaded.model
    end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    image_tok = image_token_id(model)
    current = {}

    def hook(module, args, output):
        h = block_hidden(output)
        if h.shape[1] == 1:  # a decode step: the prefill already did the work
            return None
        if on_prefill is not None:
            on_prefill(h.detach(), current["inputs"])
        if add_on_image is None:
            return None
        on_image = (current["inputs"]["input_ids"] == image_tok).unsqueeze(-1).to(h.dtype)
        return with_block_hidden(output, h + on_image * add_on_image.to(h.device, h.dtype))

    answers = []
    handle = language_model(model).layers[resolve_layer_index(model, engine.hookpoint)].register_forward_hook(hook)
    try:
        for start in range(0, len(items), batch):
            current["inputs"] = inputs = batch_inputs(loaded, root, items[start:start + batch])
            ids = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, eos_token_id=end, pad_token_id=end)
            answers += loaded.tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            if progress:
                progress(len(answers), len(items))
    finally:
        handle.remove()
    return answers


def answers_and_codes(engine, root: Path, items: list[dict], batch: int = 16, max_tokens: int = 6,
                      progress=None) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The model's greedy answers and ``pooled_codes``' pools in one pass (``batched_answers`` with
    a prefill reader). The answers are the unsteered model's as the engine gives them."""
    sae, model = engine.sae, engine.loaded.model
    image_tok = image_token_id(model)
    special = torch.tensor(sorted(special_ids(engine.loaded.tokenizer)))
    out = {key: [] for key in (*POOLS, "residual")}

    def read(h, inputs):
        for row in range(h.shape[0]):
            tokens, keep = inputs["input_ids"][row].cpu(), inputs["attention_mask"][row].cpu().bool()
            keep[int(keep.nonzero()[0])] = False  # left padding: the sequence's first position, the attention sink
            _pool(out, sae, h[row].float(), tokens, keep, image_tok, special)

    answers = batched_answers(engine, root, items, batch, max_tokens, on_prefill=read, progress=progress)
    return answers, {k: torch.stack(v) for k, v in out.items()}


def _pool(out: dict, sae, h: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor, image_tok, special,
          codes: torch.Tensor | None = None) -> None:
    """Append one sequence's pools to ``out``: positions in ``keep``, image ones and text ones
    (``codes``: the SAE's codes of ``h`` where already computed)."""
    is_image = (ids == image_tok) & keep if image_tok is not None else torch.zeros_like(keep)
    is_text = keep & ~is_image & ~torch.isin(ids, special)
    if codes is None:
        codes = sae.encode(h.to(sae.W_dec.dtype)).float().cpu()
    for pool, mask in (("image", is_image), ("text", is_text)):
        out[pool].append(codes[mask].mean(0) if mask.any() else torch.zeros(codes.shape[1]))
    out["last"].append(codes[int(keep.nonzero().max())] if keep.any() else torch.zeros(codes.shape[1]))
    out["residual"].append(h.cpu()[is_image].mean(0) if is_image.any() else torch.zeros(h.shape[1]))


@torch.inference_mode()
def image_answers_and_codes(fast, root: Path, items: list[dict], progress=None) -> tuple[list[str], dict[str, torch.Tensor]]:
    """``answers_and_codes`` from an ``effects.clamps.ImageAnswers`` pass over each image: its
    prefix and the prefix's SAE codes once, each question's text after it (unpadded, as
    ``pooled_codes``), each image's shared work dropped once read."""
    from ..effects.clamps import group_by_image

    sae = fast.sae
    image_tok = image_token_id(fast.model)
    special = torch.tensor(sorted(special_ids(fast.engine.loaded.tokenizer)))
    answers, pools = [""] * len(items), [None] * len(items)
    by_image = group_by_image(items)
    for n, (image, members) in enumerate(by_image.items()):
        fast.forget(image)
        entry = fast.prepare(root, image, [items[i] for i in members])
        prefix_codes = sae.encode(entry.hook_prefix[0].to(sae.W_dec.dtype)).float().cpu()
        said = fast.answer_image(entry, [None])[0]
        for k, i in enumerate(members):
            text = entry.hook_text[k][0]
            codes = torch.cat([prefix_codes, sae.encode(text.to(sae.W_dec.dtype)).float().cpu()])
            keep = torch.ones(len(entry.ids[k]), dtype=torch.bool)
            keep[0] = False  # the attention sink
            one = {key: [] for key in (*POOLS, "residual")}
            _pool(one, sae, torch.cat([entry.hook_prefix[0], text]).float(), entry.ids[k], keep, image_tok, special,
                  codes)
            answers[i], pools[i] = said[k], {key: v[0] for key, v in one.items()}
        fast.forget(image)
        if progress:
            progress(n + 1, len(by_image))
    return answers, {key: torch.stack([p[key] for p in pools]) for key in (*POOLS, "residual")}


@torch.inference_mode()
def pooled_codes(engine, root: Path, items: list[dict], progress=None) -> dict[str, torch.Tensor]:
    """``{"image": [N, F], "text": [N, F], "last": [N, F], "residual": [N, D]}``: mean SAE codes
    over each pool, the codes at the final prompt position, and the block output's mean over the
    image positions."""
    """As ``answers_and_codes``' codes, one example at a time through the engine's own inputs."""
    model, sae = engine.loaded.model, engine.sae
    index = resolve_layer_index(model, engine.hookpoint)
    image_tok = image_token_id(model)
    special = torch.tensor(sorted(special_ids(engine.loaded.tokenizer)))
    out = {key: [] for key in (*POOLS, "residual")}
    for n, item in enumerate(items):
        inputs = engine.prepare(request(root, item)).inputs
        ids = inputs["input_ids"][0].cpu()
        h = capture_block_output(model, index, inputs)[0].float()
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[0] = False  # the attention sink
        _pool(out, sae, h, ids, keep, image_tok, special)
        if progress:
            progress(n + 1, len(items))
    return {k: torch.stack(v) for k, v in out.items()}
