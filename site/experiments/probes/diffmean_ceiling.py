"""A ceiling probe for issue #15: how far does steering by *any* one direction get on SmolLM2-135M?

DiffMean (AxBench's strongest representation-steering baseline) with a self-made contrast: for each
concept, the mean output of block L over the model's own greedy answers (48 tokens) to five source
prompts under the prompting condition's system prompt ("Whatever you are asked, write about X."),
minus the same mean without it. The difference times ``scale`` is added to every generated position
of block L (the first token comes from the unsteered prefill, as the engine's "generated" scope).
Judged by ``lmm_steer.eval.measures`` exactly as ``lmm-steer eval steer`` judges: greedy, 40 tokens.
The source prompts are none of the evaluation prompts. Not a product path: the engine steers with
SAE features only; this bounds what a better choice of features could reach.

    python experiments/probes/diffmean_ceiling.py --concepts server/lmm_steer/eval/concepts_dev.json \
        --layers 3,6,9,10,12,13,15,20 --scales 2,3,4,5,6,8          # tuning: dev concepts only
    python experiments/probes/diffmean_ceiling.py --layers 12 --scales 0,5 --json out.json   # held-out, once
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from lmm_steer.eval import steer as S
from lmm_steer.eval.measures import degenerate, shows
from lmm_steer.models.smollm2 import load_smollm2

SOURCE_PROMPTS = ["Tell me something interesting.", "Write a paragraph.", "Describe a day.",
                  "What do you think about?", "Say anything."]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concepts", default=str(S.HELD_OUT))
    p.add_argument("--layers", default="12")
    p.add_argument("--scales", default="0,5")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    loaded = load_smollm2()
    model, tok = loaded.model, loaded.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    concepts = S.load_concepts(args.concepts)

    @torch.no_grad()
    def generate(conversations, n):
        texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in conversations]
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        return out, batch["input_ids"].shape[1]

    @torch.no_grad()
    def answer_means(system):
        convs = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
                 for q in SOURCE_PROMPTS]
        out, start = generate(convs, 48)
        attention = (out != tok.pad_token_id).long()
        hidden = model(input_ids=out, attention_mask=attention, output_hidden_states=True).hidden_states
        answer = attention[:, start:].bool()
        return [h[:, start:][answer].mean(0) for h in hidden[1:]]  # one mean per block output

    neutral = answer_means(None)
    directions = {c: [a - b for a, b in zip(answer_means(S.PROMPTING_SYSTEM.format(concept=c)), neutral, strict=True)]
                  for c in concepts.concepts}

    added = {}

    def add_direction(module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        if h.shape[1] != 1 or "v" not in added:  # the prompt's prefill stays unsteered
            return output
        h = h + added["v"][:, None, :]
        return (h, *output[1:]) if isinstance(output, tuple) else h

    names = list(concepts.concepts)
    convs = [[{"role": "user", "content": q}] for _ in names for q in concepts.prompts]
    rows, records = [], []
    for layer in [int(x) for x in args.layers.split(",")]:
        handle = model.model.layers[layer].register_forward_hook(add_direction)
        for scale in [float(x) for x in args.scales.split(",")]:
            added["v"] = torch.stack([directions[c][layer] * scale for c in names for _ in concepts.prompts])
            out, start = generate(convs, args.max_tokens)
            texts = tok.batch_decode(out[:, start:], skip_special_tokens=True)
            n = len(concepts.prompts)
            succeeded = shown = degen = 0
            for i, c in enumerate(names):
                these = texts[i * n:(i + 1) * n]
                s = sum(shows(t, concepts.concepts[c]) for t in these)
                shown, succeeded = shown + s, succeeded + (s >= -(-2 * n // 3))
                degen += sum(degenerate(t) for t in these)
                records += [{"layer": layer, "scale": scale, "concept": c, "prompt": q, "text": t}
                            for q, t in zip(concepts.prompts, these, strict=True)]
            rows.append({"layer": layer, "scale": scale, "succeeded": succeeded, "concepts": len(names),
                         "shown": shown, "degenerate": degen, "outputs": len(texts)})
            print(f"| {layer} | {scale:g} | {succeeded}/{len(names)} | {shown}/{len(texts)} | {degen}/{len(texts)} |",
                  flush=True)
        handle.remove()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": sys.argv[1:], "rows": rows, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
