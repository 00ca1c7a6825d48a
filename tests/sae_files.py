"""Writers of raw checkpoints exactly as the libraries publish them (not through our own writer)."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_sparsify(root: Path, hook="model.layers.24", d=32, m=128, k=8, cfg_extra=None, tensors=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    folder = Path(root) / hook
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"expansion_factor": m // d, "normalize_decoder": True, "num_latents": m, "k": k,
           "multi_topk": False, "d_in": d, **(cfg_extra or {})}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    w = torch.randn(m, d, generator=g)
    t = {"encoder.weight": torch.randn(m, d, generator=g), "encoder.bias": torch.randn(m, generator=g),
         "W_dec": w / w.norm(dim=1, keepdim=True), "b_dec": torch.randn(d, generator=g)}
    t.update(tensors or {})
    save_file({k_: v for k_, v in t.items() if v is not None}, str(folder / "sae.safetensors"))
    return folder


def write_saelens(folder: Path, arch="jumprelu", d=32, m=128, k=8, apply_b_dec=False, hook="blocks.3.hook_resid_post",
                  seed=0):
    g = torch.Generator().manual_seed(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"architecture": arch, "d_in": d, "d_sae": m, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": {"hook_name": hook, "model_name": "tiny"}}
    if arch == "topk":
        cfg["k"] = k
    (folder / "cfg.json").write_text(json.dumps(cfg))
    t = {"W_enc": torch.randn(d, m, generator=g), "b_enc": torch.randn(m, generator=g),
         "W_dec": torch.randn(m, d, generator=g), "b_dec": torch.randn(d, generator=g)}
    if arch == "jumprelu":
        t["threshold"] = torch.rand(m, generator=g)
    save_file(t, str(folder / "sae_weights.safetensors"))
    return folder
