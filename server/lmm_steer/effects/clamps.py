"""Greedy answers to every question about an image under many clamps on the image's positions, at a
fraction of the engine's cost and with the engine's arithmetic.

An edit on scope ``image`` changes the hook block's output at the image's positions only, and a
decoder is causal, so for one image:

* every block up to and including the hook block computes the same thing whatever the edit: the
  image's prefix (the chat header and the image tokens, shared by every question about it) and
  each question's text run through them once (``prepare``);
* per edit, only the blocks after the hook run over the prefix (the edit applied to its image
  positions, exactly as the engine's prefill hook does: ``engine.steering.apply_steering``), once
  for all of the image's questions; each question's text then runs through those blocks against
  the edited prefix, and the answer is decoded greedily, unedited, as scope ``image`` leaves
  generated tokens.

An edit whose scope also covers the question (``prompt``, ``all``) or the decoded tokens
(``generated``, ``all``) is applied there as well, between the hook block and the next, as the
engine does; the blocks up to the hook still never see an edit, so the shared work stays shared.
An edit conditioned on the request (``when``) is decided per question on the unedited hook-block
output of its whole prompt (the prefix's and the question's), as the engine's prefill decides it;
each steering then becomes, per question, the steering of its edits that act.

On the scenes model (block 15 of 30, 339 prefix tokens, questions of about 22) an edit costs
about a seventh of the engine's per-question prefills for an image's four colour and shape
questions. It needs a decoder of Llama-shaped blocks with plain positions (0, 1, 2, ...:
LLaVA-family models; ``supported`` says); ``EngineAnswers`` asks the engine itself, the same
interface for anything else (and for stand-in engines in tests).
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from ..engine import SteeringSpec
from ..engine.hookpoint import language_model
from ..engine.prefill import image_token_id
from ..engine.steering import SteeringRow, SteeringTable, apply_steering, prompt_peaks, variant_for
from ..models.inputs import build_inputs


def _messages(question: str, system: str | None = None) -> list[dict]:
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return [{"role": "system", "content": system}, *user] if system else user


class _Past:
    """A transformers cache, duck-typed: per block, the keys and values of the positions before this
    call, which each block's attention extends with its own and reads whole."""

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.kv = dict(kv or {})

    def update(self, keys, values, layer_idx, *args, **kwargs):
        if layer_idx in self.kv:
            old_k, old_v = self.kv[layer_idx]
            keys, values = torch.cat([old_k, keys], 2), torch.cat([old_v, values], 2)
        self.kv[layer_idx] = (keys, values)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv[layer_idx][0].shape[2] if layer_idx in self.kv else 0


def _cache_keyword(layer) -> str:
    """The name a decoder block's forward gives its cache argument (transformers renamed it)."""
    names = inspect.signature(layer.forward).parameters
    return next((n for n in ("cache", "past_key_values", "past_key_value") if n in names), "past_key_values")


@dataclass
class _Image:
    """One image's shared work: its prefix's hook-block output and its keys and values in the blocks
    up to the hook, and per question the hook-block output of its text and those blocks' keys and
    values over prefix and text."""

    prefix_len: int
    image_positions: torch.Tensor  # [P] indices into the prefix
    hook_prefix: torch.Tensor  # [1, T_p, D]
    questions: list[dict]
    embeds: list[torch.Tensor] | None  # per question, its text's input embeddings [1, T_q - T_p, D]
    prefix_kv: dict  # block -> (keys, values) over the prefix, blocks <= hook
    ids: list[torch.Tensor] | None = None  # per question, its whole prompt's token ids [T_q]
    hook_text: list[torch.Tensor] | None = None  # per question [1, T_q - T_p, D]
    low_kv: list[dict] | None = None  # per question: block -> (keys, values) over its text only, blocks <= hook
    base_patches: torch.Tensor | None = None  # [rows * cols, latents] SAE activations of the base grid
    grid: tuple[int, int] | None = None
    peaks: list[torch.Tensor] | None = None  # per question, [latents]: each feature's largest activation in its prompt
    text_peaks: list[torch.Tensor] | None = None  # the same over the prompt's text alone (not the image's tokens)


class ImageAnswers:
    """Answers under delta edits, computed per image as the module docstring says (an edit whose
    scope reaches the questions' text or the decoded tokens is applied there too, at the hook)."""

    def __init__(self, engine, max_tokens: int = 4, batch: int = 16, system: str | None = None) -> None:
        self.engine, self.max_tokens, self.batch, self.system = engine, max_tokens, batch, system
        self.model, self.sae, self.hook = engine.model, engine.sae, engine.hook_index
        self.decoder = language_model(self.model)
        self.head = self.model.get_output_embeddings()
        self.image_token = image_token_id(self.model)
        self.cache_kw = _cache_keyword(self.decoder.layers[0])
        self.eos = set(engine.eos_ids)
        self.device = self.head.weight.device
        self.images: dict[str, _Image] = {}

    @staticmethod
    def supported(engine) -> bool:
        """A multimodal model whose decoder this class can run block by block (positions checked
        per image in ``prepare``)."""
        try:
            decoder = language_model(engine.model)
        except Exception:
            return False
        return (engine.sae is not None and engine.hook_index >= 0 and image_token_id(engine.model) is not None
                and hasattr(decoder, "rotary_emb") and hasattr(decoder, "norm")
                and getattr(engine.loaded, "family", None) in ("llava", "llava-next", "llava-onevision"))

    # -- the decoder, block by block --------------------------------------------------------

    def _run(self, h: torch.Tensor, blocks: range, past: _Past, start: int) -> torch.Tensor:
        """``h [B, T, D]`` at positions ``start..start+T-1`` through ``blocks``, attending to
        ``past`` (each block's earlier positions) and causally within itself."""
        t = h.shape[1]
        before = past.get_seq_length(blocks.start) if blocks.start in past.kv else 0
        positions = torch.arange(start, start + t, device=h.device)[None]
        allowed = torch.ones(t, before + t, dtype=torch.bool, device=h.device).tril(before)
        mask = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill(~allowed, torch.finfo(h.dtype).min)
        mask = mask[None, None]
        embeddings = self.decoder.rotary_emb(h, positions)
        for i in blocks:
            h = self.decoder.layers[i](h, attention_mask=mask, position_ids=positions, position_embeddings=embeddings,
                                       use_cache=True, **{self.cache_kw: past})
            h = h[0] if isinstance(h, tuple) else h
        return h

    def _embeddings(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's input embeddings (image features merged) and the positions the model gives
        them, from the model's own forward, stopped before its first block."""
        got = {}

        class Stop(Exception):
            pass

        def hook(module, args, kwargs):
            got["h"] = args[0] if args else kwargs["hidden_states"]
            got["pos"] = kwargs.get("position_ids")
            raise Stop

        handle = self.decoder.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(**inputs)
        except Stop:
            pass
        finally:
            handle.remove()
        return got["h"], got["pos"]

    # -- per image ---------------------------------------------------------------------------

    @torch.inference_mode()
    def prepare_prefix(self, data: Path, image: str, questions: list[dict]) -> _Image:
        """The image's prefix through the blocks up to the hook (and the SAE's activations on its base
        view's patches); the questions' embeddings, ready for ``prepare``."""
        if image in self.images:
            return self.images[image]
        with Image.open(data / image) as im:
            picture = im.convert("RGB")
        texts = [q["question"] for q in questions] or ["Describe the image."]
        embeds, ids = [], []
        for text in texts:
            inputs = build_inputs(self.engine.loaded, _messages(text, self.system), [picture])
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            h, pos = self._embeddings(inputs)
            t = h.shape[1]
            if pos is not None and not torch.equal(pos.reshape(-1)[-t:].cpu(), torch.arange(t)):
                raise ValueError("this model's positions are not 0, 1, 2, ...: use EngineAnswers")
            embeds.append(h)
            ids.append(inputs["input_ids"][0].cpu())
        is_image = ids[0] == self.image_token
        prefix_len = int(is_image.nonzero().max()) + 1
        for e, i in zip(embeds[1:], ids[1:], strict=True):
            if not torch.equal(i[:prefix_len], ids[0][:prefix_len]) or not torch.allclose(e[:, :prefix_len],
                                                                                        embeds[0][:, :prefix_len]):
                raise ValueError(f"{image}: its questions do not share the image's prefix")
        prefix_past = _Past()
        hook_prefix = self._run(embeds[0][:, :prefix_len], range(0, self.hook + 1), prefix_past, 0)
        entry = _Image(prefix_len, is_image[:prefix_len].nonzero().flatten().to(self.device), hook_prefix,
                       list(questions), [e[:, prefix_len:] for e in embeds[:len(questions)]], prefix_past.kv,
                       ids[:len(questions)])
        from ..engine.inspect import image_grids

        grids = image_grids(self.engine.loaded, {"input_ids": ids[0][None]})
        if grids:
            positions, rows, cols = grids[0]
            x = hook_prefix[0, positions].to(self.sae.W_dec.dtype)
            entry.base_patches, entry.grid = self.sae.encode(x).float().cpu(), (rows, cols)
        self.images[image] = entry
        return entry

    @torch.inference_mode()
    def prepare(self, data: Path, image: str, questions: list[dict]) -> _Image:
        """The shared work for ``questions`` (all about ``image``): the prefix, then each question's
        text through the blocks up to the hook."""
        entry = self.prepare_prefix(data, image, questions)
        if entry.hook_text is None:
            texts, low_kv = [], []
            for e in entry.embeds:
                past = _Past(entry.prefix_kv)
                texts.append(self._run(e, range(0, self.hook + 1), past, entry.prefix_len))
                # the text's part only: the prefix's is shared (a copy per question costs ~60 MB an image)
                low_kv.append({i: (k[:, :, entry.prefix_len:].clone(), v[:, :, entry.prefix_len:].clone())
                               for i, (k, v) in past.kv.items()})
            entry.hook_text, entry.low_kv, entry.embeds = texts, low_kv, None
        return entry

    def forget(self, image: str) -> None:
        """Drop an image's shared work (a pass that will not ask about it again)."""
        self.images.pop(image, None)

    @staticmethod
    def takes(spec: SteeringSpec | torch.Tensor | None) -> bool:
        """Whether ``answer_image`` applies this steering: none, a vector on the image, or delta
        edits in any scope (paper semantics rewrites the whole block output: the engine's)."""
        return spec is None or isinstance(spec, torch.Tensor) or spec.semantics == "delta"

    @staticmethod
    def _acts_on(spec: SteeringSpec | torch.Tensor | None, part: str) -> bool:
        """Whether a steering edits the hook block's output on ``part``: the image's ``prefix``, a
        question's ``text``, or each ``decode`` step (the engine's scopes: ``image`` the image's
        positions, ``prompt`` every prompt position, ``generated`` every decoded one, ``all`` both)."""
        if spec is None or isinstance(spec, torch.Tensor):
            return spec is not None and part == "prefix"
        if not spec.edits:
            return False
        scope = spec.effective_scope
        return {"prefix": scope in ("image", "prompt", "all"), "text": scope in ("prompt", "all"),
                "decode": scope in ("generated", "all")}[part]

    def _steer(self, h: torch.Tensor, spec: SteeringSpec, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``h [T, D]`` with ``spec``'s edits applied at ``positions`` (every position when None),
        by the engine's own function."""
        if spec.semantics != "delta":
            raise ValueError("ImageAnswers applies delta edits only")
        row = SteeringRow.from_spec(spec)
        x = h if positions is None else h[positions]
        table = SteeringTable(1, max(1, len(row.ids)), self.sae.W_dec.device, self.sae.W_dec.dtype)
        table.write(0, row, True)
        rows = torch.zeros(x.shape[0], dtype=torch.long, device=self.sae.W_dec.device)
        y = apply_steering(x, self.sae, table.ids[rows], table.delta_a[rows], table.delta_b[rows], table.paper_c[rows],
                           table.paper_d[rows], table.paper[rows], variant_for([(row, True)]), dirs=table.dirs[rows],
                           gates=table.gates[rows]).to(h.dtype)
        if positions is None:
            return y
        out = h.clone()
        out[positions] = y
        return out

    def _steered(self, h: torch.Tensor, specs: list, part: str) -> torch.Tensor:
        """``h [1 or B, T, D]`` as ``[B, T, D]``, each row with its spec's edits where they act on ``part``."""
        if not any(self._acts_on(s, part) for s in specs):
            return h.expand(len(specs), -1, -1)
        return torch.stack([self._steer(h[min(b, h.shape[0] - 1)], s) if self._acts_on(s, part)
                            else h[min(b, h.shape[0] - 1)] for b, s in enumerate(specs)])

    def _edited_prefix(self, entry: _Image, specs: list[SteeringSpec | torch.Tensor | None]) -> torch.Tensor:
        """``[B, T_p, D]``: the prefix's hook-block output with each spec's edits where its scope
        reaches (a tensor ``[D]`` instead of a spec: added at the image positions, a direction no
        SAE edit expresses)."""
        out = entry.hook_prefix.expand(len(specs), -1, -1).clone()
        for b, spec in enumerate(specs):
            if isinstance(spec, torch.Tensor):
                out[b, entry.image_positions] += spec.to(out.device, out.dtype)
            elif self._acts_on(spec, "prefix"):
                on_image = entry.image_positions if spec.effective_scope == "image" else None
                out[b] = self._steer(out[b], spec, on_image)
        return out

    @torch.inference_mode()
    def prompt_peaks(self, entry: _Image, q: int, text: bool = False) -> torch.Tensor:
        """``[latents]``: each feature's largest SAE activation over question ``q``'s whole prompt (with
        ``text``: over its text alone, every position but the image's tokens), in the unedited
        hook-block output (positive: a ``when`` condition on it holds there). Both are read from one
        encode of the prompt and kept."""
        if entry.peaks is None:
            entry.peaks, entry.text_peaks = [None] * len(entry.questions), [None] * len(entry.questions)
        if entry.peaks[q] is None:
            h = torch.cat([entry.hook_prefix[0], entry.hook_text[q][0]])
            is_text = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
            is_text[entry.image_positions] = False
            every = torch.arange(self.sae.num_latents, device=self.sae.W_dec.device)
            whole, on_text = prompt_peaks(self.sae, h, every, rank_by_count=False, rows=is_text)
            entry.peaks[q], entry.text_peaks[q] = whole.float().cpu(), on_text.float().cpu()
        return (entry.text_peaks if text else entry.peaks)[q]

    def _decided(self, entry: _Image, spec, q: int):
        """``spec`` as it acts on question ``q``: its edits whose ``when`` condition fires there (on
        the whole prompt or its text, as each says), the condition dropped (None when no edit is left)."""
        if not isinstance(spec, SteeringSpec) or not spec.conditional:
            return spec

        def holds(e) -> bool:
            return e.when is None or bool(self.prompt_peaks(entry, q, e.when_on == "text")[e.when] > 0)

        acting = [replace(e, when=None, when_on="prompt") for e in spec.edits if holds(e)]
        return replace(spec, edits=acting) if acting else None

    @torch.inference_mode()
    def answer_image(self, entry: _Image, specs: list[SteeringSpec | torch.Tensor | None]) -> list[list[str]]:
        """``[spec][question]``: the greedy answer to each of the image's questions under each spec
        (a conditioned spec answered, per question, as the spec of its acting edits)."""
        if not any(isinstance(s, SteeringSpec) and s.conditional for s in specs):
            return self._answer_image(entry, specs)

        def key(spec):
            if spec is None or (isinstance(spec, SteeringSpec) and not spec.edits):
                return ("none",)
            if isinstance(spec, torch.Tensor):
                return ("vector", id(spec))
            return ("spec", tuple(spec.edits), spec.effective_scope, spec.semantics)

        decided = [[self._decided(entry, s, q) for q in range(len(entry.questions))] for s in specs]
        unique = {key(d): d for row in decided for d in row}
        order = {k: i for i, k in enumerate(unique)}
        got = self._answer_image(entry, list(unique.values()))
        return [[got[order[key(d)]][q] for q, d in enumerate(row)] for row in decided]

    def _answer_image(self, entry: _Image, specs: list[SteeringSpec | torch.Tensor | None]) -> list[list[str]]:
        out: list[list[str]] = []
        high = range(self.hook + 1, len(self.decoder.layers))
        for start in range(0, len(specs), self.batch):
            chunk = specs[start:start + self.batch]
            b = len(chunk)
            prefix_past = _Past()
            self._run(self._edited_prefix(entry, chunk), high, prefix_past, 0)
            answers = [[""] * len(entry.questions) for _ in chunk]
            for q in range(len(entry.questions)):
                low = {i: (torch.cat([entry.prefix_kv[i][0], k], 2).expand(b, -1, -1, -1),
                           torch.cat([entry.prefix_kv[i][1], v], 2).expand(b, -1, -1, -1))
                       for i, (k, v) in entry.low_kv[q].items()}
                past = _Past(low | prefix_past.kv)
                text = entry.hook_text[q]
                h = self._run(self._steered(text, chunk, "text"), high, past, entry.prefix_len)
                position = entry.prefix_len + text.shape[1]
                generated = [[] for _ in range(b)]
                live = torch.ones(b, dtype=torch.bool)
                for step in range(self.max_tokens):
                    token = self.head(self.decoder.norm(h[:, -1])).float().argmax(-1)
                    for r, t in enumerate(token.tolist()):
                        if live[r]:
                            if t in self.eos:
                                live[r] = False
                            else:
                                generated[r].append(t)
                    if step + 1 == self.max_tokens or not live.any():
                        break
                    x = self.decoder.embed_tokens(token[:, None])
                    if any(self._acts_on(spec, "decode") for spec in chunk):
                        h = self._run(x, range(0, self.hook + 1), past, position)
                        h = self._run(self._steered(h, chunk, "decode"), high, past, position)
                    else:
                        h = self._run(x, range(0, len(self.decoder.layers)), past, position)
                    position += 1
                tok = self.engine.loaded.tokenizer
                for r in range(b):
                    answers[r][q] = tok.decode(generated[r], skip_special_tokens=True)
            out += answers
        return out

    def answers(self, data: Path, items: list[dict], specs: list[SteeringSpec | torch.Tensor | None]) -> list[list[str]]:
        """``[spec][item]`` for questions about any images (each image prepared once)."""
        by_image = group_by_image(items)
        result = [[""] * len(items) for _ in specs]
        for image, members in by_image.items():
            asked = [items[i] for i in members]
            known = {q["question"] for q in self.images[image].questions} if image in self.images else set()
            if image in self.images and not {q["question"] for q in asked} <= known:
                asked = self.images.pop(image).questions + asked  # prepared for other questions: again, for all
            entry = self.prepare(data, image, asked)
            index = {q["question"]: k for k, q in enumerate(entry.questions)}
            got = self.answer_image(entry, specs)
            for i in members:
                for s in range(len(specs)):
                    result[s][i] = got[s][index[items[i]["question"]]]
        return result


class EngineAnswers:
    """The same interface through the engine's own generation (``eval.fix.ask``): any model, and
    stand-in engines."""

    def __init__(self, engine, max_tokens: int = 4) -> None:
        self.engine, self.max_tokens = engine, max_tokens
        self.images: dict = {}

    def answers(self, data: Path, items: list[dict], specs: list[SteeringSpec | None]) -> list[list[str]]:
        from ..eval.fix import ask

        flat = ask(self.engine, data, [q for _ in specs for q in items], [s for s in specs for _ in items],
                   max_tokens=self.max_tokens)
        return [flat[k * len(items):(k + 1) * len(items)] for k in range(len(specs))]


def group_by_image(items: list[dict]) -> dict[str, list[int]]:
    by_image: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(items):
        by_image[q["image"]].append(i)
    return dict(by_image)


def answerer(engine, max_tokens: int = 4, batch: int = 16):
    """The fast answerer where the model allows it, else the engine's."""
    if ImageAnswers.supported(engine):
        return ImageAnswers(engine, max_tokens, batch)
    return EngineAnswers(engine, max_tokens)
