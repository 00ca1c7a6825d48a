"""Plain-PyTorch reference of the steering formulas, run through transformers' own generate().

Deliberately independent of the engine: dense SAE encode, a Python loop over edits, a forward hook
on the block and HF's dynamic cache.
"""

import torch
import torch.nn.functional as F


def reference_generate(lm, inputs, sae, layer_idx, edits, scope="all", semantics="delta", max_new_tokens=8):
    model = lm.model
    layer = model.get_decoder().layers[layer_idx]
    image_id = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", None)
    ids = inputs["input_ids"][0]
    calls = {"n": 0}

    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        prefill = calls["n"] == 0
        calls["n"] += 1
        t = h.shape[1]
        if prefill:
            if scope in ("all", "prompt"):
                mask = torch.ones(t, dtype=torch.bool)
            elif scope == "image":
                mask = ids == image_id
            else:
                mask = torch.zeros(t, dtype=torch.bool)
        else:
            mask = torch.full((t,), scope in ("all", "generated"))
        mask = mask[None, :, None].to(h.dtype)
        if semantics == "delta":
            z = sae.encode(h)
            new = h
            for e in edits:
                # a gated edit ("where"): only at positions where its gate feature is active
                gate = 1.0 if getattr(e, "where", None) is None else (z[..., e.where : e.where + 1] > 0).to(h.dtype)
                if e.mode == "transfer":  # the source's activation, along this feature's direction
                    new = new + gate * mask * e.value * z[..., e.source : e.source + 1] * sae.W_dec[e.feature]
                    continue
                zj = z[..., e.feature : e.feature + 1]
                target = {"clamp": e.value, "add": zj + e.value, "scale": e.value * zj}[e.mode]
                new = new + gate * mask * (target - zj) * sae.W_dec[e.feature]
        else:
            pre = F.relu(sae.pre_activations(h))
            for e in edits:
                pj = pre[..., e.feature : e.feature + 1]
                edited = {"clamp": torch.full_like(pj, e.value), "add": pj + e.value, "scale": pj * e.value}[e.mode]
                pre = torch.cat([pre[..., : e.feature], mask * edited + (1 - mask) * pj, pre[..., e.feature + 1 :]], -1)
            vals, idx = pre.topk(sae.k, dim=-1)
            new = torch.zeros_like(pre).scatter(-1, idx, vals) @ sae.W_dec + sae.b_dec
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = layer.register_forward_hook(hook) if (edits or semantics == "paper") else None
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
    finally:
        if handle:
            handle.remove()
    tokens = out.sequences[0, ids.shape[0]:].tolist()
    logprobs = [float(torch.log_softmax(lg[0].float(), -1)[tok]) for lg, tok in zip(out.logits, tokens, strict=True)]
    return tokens, logprobs
