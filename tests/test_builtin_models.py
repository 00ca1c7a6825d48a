import pytest
import torch
from PIL import Image

from lmm_steer.models.builtin import TINY_MODELS
from lmm_steer.models.inputs import build_inputs
from lmm_steer.models.loader import ModelLoadError, load_model
from sae_weights import load_sae


def _image(w=50, h=40):
    g = torch.Generator().manual_seed(1)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


IMAGE_TOKEN = {"llava-next": "<image>", "llava": "<image>", "llava-onevision": "<image>", "qwen2-vl": "<|image_pad|>",
               "idefics3": "<image>"}


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_builtin_forward_with_image(name):
    lm = load_model(name)
    assert lm.name == name and not lm.model.training
    mm = lm.is_multimodal
    content = ([{"type": "image"}] if mm else []) + [{"type": "text", "text": "What is in this picture?"}]
    inputs = build_inputs(lm, [{"role": "user", "content": content}], [_image()] if mm else None)
    ids = inputs["input_ids"]
    if mm:
        n_image = int((ids == lm.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[lm.family])).sum())
        assert n_image > 1, "the processor must expand the image placeholder into image tokens"
    with torch.no_grad():
        logits = lm.model(**inputs).logits
    assert logits.shape == (1, ids.shape[1], len(lm.tokenizer)) and torch.isfinite(logits).all()
    # deterministic per seed: a second build gives the same logits
    with torch.no_grad():
        again = load_model(name).model(**inputs).logits
    torch.testing.assert_close(logits, again)


def test_llava_next_anyres_token_count_depends_on_image_shape():
    lm = load_model("builtin:tiny-llava-next")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    image_id = lm.tokenizer.convert_tokens_to_ids("<image>")
    wide = build_inputs(lm, msgs, [_image(96, 32)])["input_ids"]
    square = build_inputs(lm, msgs, [_image(64, 64)])["input_ids"]
    assert int((wide == image_id).sum()) != int((square == image_id).sum())


def test_tokenizer_round_trips_text_and_has_chat_template():
    lm = load_model("builtin:tiny-llama")
    text = "Tell me a story about Alice and Bob."
    assert lm.tokenizer.decode(lm.tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                              tokenize=False)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_random_sae_matches_builtin_hidden_size():
    lm = load_model("builtin:tiny-llava-next")
    hidden = lm.model.config.text_config.hidden_size
    sae = load_sae("builtin:random-topk", d_in=hidden)
    assert sae.d_in == hidden
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.num_latents))


def test_unknown_builtin_model():
    with pytest.raises(ModelLoadError, match="unknown builtin model 'builtin:tiny-gpt'"):
        load_model("builtin:tiny-gpt")


@pytest.mark.parametrize("name", sorted(n for n in TINY_MODELS if n != "builtin:tiny-llama"))
def test_image_grid_of_every_family_lies_on_its_image_tokens(name):
    """The inspector's per-image feature grid (base view, merged patches or global view) is a
    rows x cols block of image-token positions, for every multimodal family."""
    from lmm_steer.engine.inspect import image_grids

    lm = load_model(name)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    inputs = build_inputs(lm, msgs, [_image()])
    ids = inputs["input_ids"][0]
    image_id = lm.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[lm.family])
    [(positions, rows, cols)] = image_grids(lm, inputs)
    assert rows > 1 and cols > 1 and len(positions) == rows * cols
    assert all(int(ids[p]) == image_id for p in positions)
