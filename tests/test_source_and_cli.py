import json
import os
import subprocess
import sys

import pytest
import torch

from sae_weights import SAESourceError, load_directory, load_sae, resolve_directory

from sae_files import write_saelens, write_sparsify

REPO = "lmms-lab/llama3-llava-next-8b-hf-sae-131k"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lmm_steer.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=120)


def _fake_hub_cache(cache, repo=REPO, hook="model.layers.24"):
    """The directory structure huggingface_hub leaves after a download of ``repo``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    write_sparsify(base / "snapshots" / commit, hook=hook)
    return base / "snapshots" / commit / hook


def test_hub_source_offline_uses_cache(tmp_path):
    _fake_hub_cache(tmp_path / "hub")
    out = _cli("sae", "info", REPO, "--hookpoint", "model.layers.24", env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["format"] == "sparsify" and info["num_latents"] == 128 and info["k"] == 8
    assert info["hookpoint"] == "model.layers.24" and info["path"].endswith("model.layers.24")
    # shorthand repo/subfolder form resolves to the same place
    out2 = _cli("sae", "info", f"{REPO}/model.layers.24", env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert json.loads(out2.stdout)["path"] == info["path"]


def test_hub_source_offline_without_cache_names_repo(tmp_path):
    out = _cli("sae", "info", REPO, "--hookpoint", "model.layers.24", env={"HF_HUB_CACHE": str(tmp_path / "empty")})
    assert out.returncode == 1
    assert REPO in out.stderr and "hub is unreachable" in out.stderr and "Traceback" not in out.stderr


def test_local_dir_picks_single_subfolder_or_asks(tmp_path):
    write_sparsify(tmp_path, hook="model.layers.3")
    assert resolve_directory(tmp_path).name == "model.layers.3"
    write_sparsify(tmp_path, hook="model.layers.5")
    with pytest.raises(SAESourceError, match="several SAEs.*--hookpoint"):
        resolve_directory(tmp_path)
    assert load_sae(tmp_path, hookpoint="model.layers.5").cfg.hookpoint == "model.layers.5"
    with pytest.raises(SAESourceError, match="no subfolder 'model.layers.9'"):
        resolve_directory(tmp_path, "model.layers.9")


def test_builtin_source_options():
    sae = load_sae("builtin:random-topk:latents=100,k=3,seed=1", d_in=24)
    assert (sae.d_in, sae.num_latents, sae.k) == (24, 100, 3)
    with pytest.raises(SAESourceError, match="needs d_in"):
        load_sae("builtin:random-topk")
    with pytest.raises(SAESourceError, match="bad option"):
        load_sae("builtin:random-topk:width=3", d_in=4)


def test_cli_info_fields(tmp_path):
    write_saelens(tmp_path / "sl", arch="topk", k=5)
    info = json.loads(_cli("sae", "info", str(tmp_path / "sl")).stdout)
    assert info == {**info, "format": "saelens", "d_in": 32, "num_latents": 128, "k": 5, "activation": "topk",
                    "dtype": "float32", "hookpoint": "blocks.3.hook_resid_post"}
    assert info["bytes"] == (tmp_path / "sl" / "sae_weights.safetensors").stat().st_size


def test_cli_convert_both_ways_preserves_encode_decode(tmp_path):
    src = write_sparsify(tmp_path / "src")
    out = _cli("sae", "convert", str(tmp_path / "src"), str(tmp_path / "sl"), "--to", "saelens")
    assert out.returncode == 0, out.stderr
    out = _cli("sae", "convert", str(tmp_path / "sl"), str(tmp_path / "sp"), "--to", "sparsify")
    assert out.returncode == 0, out.stderr
    a, b, c = (load_directory(p) for p in (src, tmp_path / "sl", tmp_path / "sp" / "model.layers.24"))
    x = torch.randn(8, 32)
    for s in (b, c):
        torch.testing.assert_close(s.encode(x), a.encode(x))
        torch.testing.assert_close(s(x), a(x))


def test_cli_convert_failure_leaves_nothing(tmp_path):
    write_saelens(tmp_path / "j", arch="jumprelu")
    out = _cli("sae", "convert", str(tmp_path / "j"), str(tmp_path / "dst"), "--to", "sparsify",
               "--hookpoint", "x")
    assert out.returncode == 1 and "only holds TopK" in out.stderr
    assert not (tmp_path / "dst").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j"]


def test_generate_without_an_sae_says_so_in_cli_terms():
    # --model X without --sae runs no SAE, so a clamp has nothing to act on
    out = _cli("generate", "--model", "builtin:tiny-llama", "--prompt", "hi", "--clamp", "1=2", "--max-tokens", "2")
    assert out.returncode == 1
    assert "no SAE is loaded" in out.stderr and "--sae" in out.stderr and "server" not in out.stderr


def test_clamp_arguments_take_a_transfer_with_its_source():
    import argparse

    from lmm_steer.cli import parse_clamp
    from lmm_steer.engine import FeatureEdit

    assert parse_clamp("11=2.5:transfer:7") == FeatureEdit(11, 2.5, "transfer", 7)
    assert parse_clamp("11=2.5:add") == FeatureEdit(11, 2.5, "add")
    assert parse_clamp("11=2.5@4") == FeatureEdit(11, 2.5, where=4)
    assert parse_clamp("11=2.5:transfer:7@4") == FeatureEdit(11, 2.5, "transfer", 7, 4)
    for bad in ("11=2.5:transfer", "11=2.5:clamp:7", "11=2.5:transfer:x", "11=2.5@", "11=2.5@red"):
        with pytest.raises(argparse.ArgumentTypeError, match="transfer:SOURCE"):
            parse_clamp(bad)
