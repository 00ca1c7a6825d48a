"""Tiny random-weight models of real architectures, built offline.

Each is the real transformers model class made from a small config, with a byte-level BPE
tokenizer trained in-process (``tokenizers``), the family's real chat-template shape and its real
image processor class. They exercise exactly the code paths of the full-size models (AnyRes
tiling, image-token expansion, M-RoPE, pixel shuffle) in milliseconds on a CPU.
Weights are deterministic per seed.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .loaded import LoadedModel

# A few hundred words of plain English, enough for BPE to learn useful merges.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A picture of a cat sitting on a red chair.
Tell me a story about Alice and Bob. Alice met Bob at the market and they bought apples.
What is in this image? Describe the image in detail. There is a dog, a tree and a blue sky.
The weather is sunny today and the children play in the park near the river.
Bob likes to read books about science, history, music and the ocean. The ship sails at dawn.
Please answer the question. Yes. No. I think the answer is three. The number is 42.
A man rides a bicycle down the street. A woman holds an umbrella in the rain.
The coffee is hot. The moon is bright. Mountains, forests, cities, roads and bridges.
""".strip()


def _train_tokenizer(special: list[str], vocab_size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    return tok


def _fast_tokenizer(special: list[str], chat_template: str, **roles):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(special), chat_template=chat_template, **roles
    )
    return tok


# Chat templates written for the tiny models in the shape of each family's real one.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] if c['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAVA15_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() + ': ' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] if c['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}"
    "{{ ' ' }}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CHATML_VL_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] if c['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<image>", "<pad>"]


def family_image_processor(module: str, class_name: str, **kwargs):
    """The family's real image processor, PIL backend where this transformers has one (it needs no
    torchvision), else the default class (older 5.x releases, or torchvision present)."""
    import importlib

    try:
        mod = importlib.import_module(f"transformers.models.{module}.image_processing_pil_{module}")
        cls = getattr(mod, f"{class_name}Pil")
    except (ImportError, AttributeError):
        import transformers

        cls = getattr(transformers, class_name)
    return cls(**kwargs)


def _without_video_check(processor_cls):
    """``processor_cls`` without the constructor's class check of its video processor. Without
    torchvision, transformers' video-processor registry is a placeholder and that check fails even
    when no video is ever passed; images never touch the video half."""

    class ImageOnly(processor_cls):
        def check_argument_for_proper_class(self, attribute_name, arg):
            if attribute_name != "video_processor":
                return super().check_argument_for_proper_class(attribute_name, arg)

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_cls.__name__
    return ImageOnly


def _tiny_llama_config(vocab_size: int, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        # wider than the default 0.02 so random models give varied, non-degenerate continuations
        initializer_range=0.15, **extra,
    )


def _seeded(build):
    """Build the model under a fixed seed so the same name always gives the same weights (on a given
    device), allocating it directly on ``device`` in ``dtype``: an 8B-shaped model never exists on
    the host."""

    @functools.wraps(build)
    def wrapper(seed: int = 0, device="cpu", dtype=torch.float32) -> LoadedModel:
        previous = torch.get_default_dtype()
        try:
            torch.set_default_dtype(dtype)
            with torch.random.fork_rng(devices=[]), torch.device(device):
                torch.manual_seed(seed)
                loaded = build()
        finally:
            torch.set_default_dtype(previous)
        loaded.model.to(device=device, dtype=dtype).eval()
        return loaded

    return wrapper


def _llama3_tokenizer():
    return _fast_tokenizer(
        LLAMA3_SPECIAL, LLAMA3_TEMPLATE,
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<pad>",
    )


@_seeded
def tiny_llama() -> LoadedModel:
    from transformers import LlamaForCausalLM

    tok = _llama3_tokenizer()
    cfg = _tiny_llama_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return LoadedModel("builtin:tiny-llama", "llama", LlamaForCausalLM(cfg), tok, None)


def _clip_vision(**extra):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=32, **extra,
    )


def _llava_like(model_cls, config_cls, processor_cls, image_processor, template, name, family, **cfg_extra):
    tok = (
        _llama3_tokenizer() if template is LLAMA3_TEMPLATE else
        _fast_tokenizer(["<s>", "</s>", "<image>", "<pad>"], template,
                        bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    )
    text = _tiny_llama_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    cfg = config_cls(
        vision_config=_clip_vision(), text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", **cfg_extra,
    )
    processor = processor_cls(
        image_processor=image_processor, tokenizer=tok, patch_size=8,
        vision_feature_select_strategy="default", chat_template=template, num_additional_image_tokens=1,
    )
    return LoadedModel(name, family, model_cls(cfg), tok, processor)


TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]


@_seeded
def tiny_llava_next() -> LoadedModel:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    image_processor = family_image_processor(
        "llava_next", "LlavaNextImageProcessor", size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=TINY_PINPOINTS,
    )
    return _llava_like(
        LlavaNextForConditionalGeneration, LlavaNextConfig, LlavaNextProcessor, image_processor,
        LLAMA3_TEMPLATE, "builtin:tiny-llava-next", "llava-next", image_grid_pinpoints=TINY_PINPOINTS,
    )


@_seeded
def tiny_llava() -> LoadedModel:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    image_processor = family_image_processor(
        "clip", "CLIPImageProcessor", size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return _llava_like(
        LlavaForConditionalGeneration, LlavaConfig, LlavaProcessor, image_processor,
        LLAVA15_TEMPLATE, "builtin:tiny-llava", "llava",
    )


def _qwen2_vl_like(model_cls, config_cls, vision_config: dict, name: str) -> LoadedModel:
    """A tiny Qwen2-VL-family model: ChatML with vision tokens, a Qwen2 text tower with M-RoPE, the
    family's image processor behind :class:`Qwen2VLImageInputs`; ``vision_config`` is the tower."""
    from .qwen2_vl_inputs import Qwen2VLImageInputs

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    tok = _fast_tokenizer(special, CHATML_VL_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in special}
    cfg = config_cls(
        text_config={
            "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"], "bos_token_id": None,
            "initializer_range": 0.15,
        },
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    image_processor = family_image_processor(
        "qwen2_vl", "Qwen2VLImageProcessor", patch_size=4, merge_size=2, temporal_patch_size=2,
        min_pixels=16 * 16, max_pixels=64 * 64,
    )
    processor = Qwen2VLImageInputs(image_processor, tok, CHATML_VL_TEMPLATE)
    return LoadedModel(name, "qwen2-vl", model_cls(cfg), tok, processor)


@_seeded
def tiny_qwen2_vl() -> LoadedModel:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2, "patch_size": 4,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3}
    return _qwen2_vl_like(Qwen2VLForConditionalGeneration, Qwen2VLConfig, vision, "builtin:tiny-qwen2-vl")


_IDEFICS3_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "image_size": 32, "patch_size": 8}


def _idefics3_tokenizer():
    rows = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    special = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
               "<global-img>", *rows]
    return _fast_tokenizer(special, IDEFICS3_TEMPLATE, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                           pad_token="<|endoftext|>")


@_seeded
def tiny_idefics3() -> LoadedModel:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    tok = _idefics3_tokenizer()
    text = _tiny_llama_config(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = Idefics3Config(
        vision_config=_IDEFICS3_VISION, text_config=text.to_dict(), scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id,
    )
    image_processor = family_image_processor(
        "idefics3", "Idefics3ImageProcessor", size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
    )
    processor = Idefics3Processor(image_processor, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)
    return LoadedModel("builtin:tiny-idefics3", "idefics3", Idefics3ForConditionalGeneration(cfg), tok, processor)


@_seeded
def tiny_llava_onevision() -> LoadedModel:
    """LLaVA-OneVision's shape: a Qwen2 text tower (biased q/k/v), a SigLIP vision tower whose
    every patch is kept ("full"), AnyRes tiling with the anyres_max_9 cap, ChatML."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tok = _fast_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
                          CHATML_LLAVA_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    text = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False, initializer_range=0.15,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)
    cfg = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=TINY_PINPOINTS,
    )
    image_processor = family_image_processor(
        "llava_onevision", "LlavaOnevisionImageProcessor", size={"height": 32, "width": 32},
        image_grid_pinpoints=TINY_PINPOINTS,
    )
    processor = _without_video_check(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tok, video_processor=None, num_image_tokens=16,
        vision_feature_select_strategy="full", chat_template=CHATML_LLAVA_TEMPLATE, vision_aspect_ratio="anyres_max_9",
    )
    return LoadedModel("builtin:tiny-llava-onevision", "llava-onevision", LlavaOnevisionForConditionalGeneration(cfg),
                       tok, processor)


@_seeded
def tiny_qwen2_5_vl() -> LoadedModel:
    """Qwen2.5-VL's shape: Qwen2-VL's text tower and M-RoPE, a windowed-attention vision tower with
    RMSNorm and a gated MLP."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
              "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
              "window_size": 16, "fullatt_block_indexes": [1]}
    return _qwen2_vl_like(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig, vision, "builtin:tiny-qwen2.5-vl")


@_seeded
def tiny_smolvlm() -> LoadedModel:
    """SmolVLM's shape: Idefics3's (SigLIP-style vision, pixel shuffle, image splitting) with its
    own model and processor classes."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor

    tok = _idefics3_tokenizer()
    cfg = SmolVLMConfig(
        vision_config=_IDEFICS3_VISION, text_config=_tiny_llama_config(
            len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).to_dict(),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id,
    )
    image_processor = family_image_processor(
        "smolvlm", "SmolVLMImageProcessor", size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
    )
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    # its chat template reads the video processor's frame count even for images
    processor = _without_video_check(SmolVLMProcessor)(image_processor, tok, SmolVLMVideoProcessor(),
                                                       image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)
    return LoadedModel("builtin:tiny-smolvlm", "idefics3", SmolVLMForConditionalGeneration(cfg), tok, processor)


# LLaVA-NeXT-8B's real shapes (llava-hf/llama3-llava-next-8b-hf): Llama-3-8B text tower, CLIP-L/336
# vision tower, AnyRes up to 672 px. Random weights; for benchmarks on a GPU, never for meaning.
LLAVA_NEXT_8B_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@_seeded
def random_llava_next_8b() -> LoadedModel:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )

    tok = _llama3_tokenizer()
    text = LlamaConfig(
        vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )
    cfg = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=LLAVA_NEXT_8B_PINPOINTS,
    )
    image_processor = family_image_processor(
        "llava_next", "LlavaNextImageProcessor", size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336}, image_grid_pinpoints=LLAVA_NEXT_8B_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        chat_template=LLAMA3_TEMPLATE, num_additional_image_tokens=1,
    )
    return LoadedModel("builtin:random-llava-next-8b", "llava-next", LlavaNextForConditionalGeneration(cfg), tok,
                       processor)


BUILTIN_MODELS = {
    "builtin:tiny-llava-next": tiny_llava_next,
    "builtin:tiny-llava": tiny_llava,
    "builtin:tiny-qwen2-vl": tiny_qwen2_vl,
    "builtin:tiny-idefics3": tiny_idefics3,
    "builtin:tiny-llava-onevision": tiny_llava_onevision,
    "builtin:tiny-qwen2.5-vl": tiny_qwen2_5_vl,
    "builtin:tiny-smolvlm": tiny_smolvlm,
    "builtin:tiny-llama": tiny_llama,
    "builtin:random-llava-next-8b": random_llava_next_8b,
}
TINY_MODELS = [name for name in BUILTIN_MODELS if name.startswith("builtin:tiny-")]


def build_builtin(name: str, seed: int = 0, device="cpu", dtype=torch.float32) -> LoadedModel:
    try:
        builder = BUILTIN_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown builtin model {name!r} (known: {sorted(BUILTIN_MODELS)})") from None
    return builder(seed, device, dtype)
