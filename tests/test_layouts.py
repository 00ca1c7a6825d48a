import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_weights import SAELENS, SPARSIFY, SAEFormatError, detect_layout, load_directory, load_sae, save_sae

from sae_files import write_saelens, write_sparsify


def test_paper_checkpoint_loads_and_encodes(tmp_path):
    folder = write_sparsify(tmp_path, cfg_extra={"signed": False, "activation": "topk"})
    sae = load_sae(tmp_path, hookpoint="model.layers.24")
    raw = load_file(str(folder / "sae.safetensors"))
    x = torch.randn(4, 32)
    pre = torch.relu((x - raw["b_dec"]) @ raw["encoder.weight"].T + raw["encoder.bias"])
    v, i = pre.topk(8, dim=-1)
    ref = torch.zeros_like(pre).scatter(-1, i, v)
    torch.testing.assert_close(sae.encode(x), ref)
    torch.testing.assert_close(sae(x), ref @ raw["W_dec"] + raw["b_dec"])
    assert sae.cfg.hookpoint == "model.layers.24" and sae.k == 8


def test_sparsify_num_latents_zero_uses_expansion_factor(tmp_path):
    write_sparsify(tmp_path, cfg_extra={"num_latents": 0, "expansion_factor": 4})
    assert load_sae(tmp_path).num_latents == 128


@pytest.mark.parametrize("layout", [SPARSIFY, SAELENS])
def test_round_trip(tmp_path, layout):
    src = write_sparsify(tmp_path / "src")
    a = load_directory(src)
    out = save_sae(a, tmp_path / "dst", layout)
    assert detect_layout(out) == layout
    b = load_directory(out)
    x = torch.randn(6, 32)
    torch.testing.assert_close(a.encode(x), b.encode(x))
    torch.testing.assert_close(a.decode(a.encode(x)), b.decode(b.encode(x)))


@pytest.mark.parametrize("arch,apply_b_dec", [("topk", False), ("topk", True)])
def test_saelens_to_sparsify_to_saelens_equal(tmp_path, arch, apply_b_dec):
    original = load_directory(write_saelens(tmp_path / "sl", arch=arch, apply_b_dec=apply_b_dec))
    mid = save_sae(original, tmp_path / "sp", SPARSIFY, hookpoint="blocks.3.hook_resid_post")
    back = load_directory(save_sae(load_directory(mid), tmp_path / "sl2", SAELENS))
    x = torch.randn(10, 32)
    for sae in (load_directory(mid), back):
        torch.testing.assert_close(sae.encode(x), original.encode(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sae(x), original(x), rtol=1e-4, atol=1e-4)


def test_saelens_jumprelu_loads_and_cannot_go_to_sparsify(tmp_path):
    sae = load_directory(write_saelens(tmp_path / "j"))
    assert sae.cfg.activation == "jumprelu" and sae.cfg.hookpoint == "blocks.3.hook_resid_post"
    with pytest.raises(SAEFormatError, match="only holds TopK"):
        save_sae(sae, tmp_path / "out", SPARSIFY, hookpoint="h")
    assert not (tmp_path / "out").exists()
    back = load_directory(save_sae(sae, tmp_path / "sl", SAELENS))
    x = torch.randn(3, 32)
    torch.testing.assert_close(back.encode(x), sae.encode(x))


def test_load_into_target_dtype(tmp_path):
    sae = load_sae(write_sparsify(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in sae.parameters()} == {torch.bfloat16}


# -- rejections: each names the file and the problem -----------------------------------------

def test_missing_cfg(tmp_path):
    folder = write_sparsify(tmp_path)
    (folder / "cfg.json").unlink()
    with pytest.raises(SAEFormatError, match=r"cfg\.json: missing"):
        load_directory(folder)


def test_unknown_layout(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(SAEFormatError, match="unknown SAE layout"):
        load_directory(tmp_path)


def test_pickle_refused_and_never_opened(tmp_path):
    # A file that would execute code if unpickled: loading must refuse before reading it.
    (tmp_path / "sae.pt").write_bytes(b"\x80\x04cos\nsystem\n(S'touch pwned'\ntR.")
    with pytest.raises(SAEFormatError, match=r"sae\.pt: pickle checkpoints are never loaded"):
        load_sae(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_shape_disagrees_with_config(tmp_path):
    folder = write_sparsify(tmp_path, tensors={"W_dec": torch.randn(128, 31)})
    with pytest.raises(SAEFormatError, match=r"sae\.safetensors: tensor 'W_dec' has shape \[128, 31\]"):
        load_directory(folder)


def test_missing_and_extra_tensors(tmp_path):
    folder = write_sparsify(tmp_path / "a", tensors={"b_dec": None})
    with pytest.raises(SAEFormatError, match="missing tensors.*b_dec"):
        load_directory(folder)
    folder = write_sparsify(tmp_path / "b", tensors={"W_skip": torch.zeros(32, 32)})
    with pytest.raises(SAEFormatError, match="unexpected tensors.*W_skip"):
        load_directory(folder)


def test_nan_weights(tmp_path):
    bad = torch.randn(128, 32)
    bad[77, 3] = float("nan")
    with pytest.raises(SAEFormatError, match="'encoder.weight' contains NaN"):
        load_directory(write_sparsify(tmp_path, tensors={"encoder.weight": bad}))


def test_bad_cfg_values(tmp_path):
    folder = write_sparsify(tmp_path, cfg_extra={"k": "eight"})
    with pytest.raises(SAEFormatError, match="'k' must be a positive integer"):
        load_directory(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match="not valid JSON"):
        load_directory(folder)


def test_unsupported_saelens_normalisation(tmp_path):
    folder = write_saelens(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["normalize_activations"] = "expected_average_only_in"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="normalize_activations"):
        load_directory(folder)


def test_truncated_safetensors(tmp_path):
    folder = write_sparsify(tmp_path)
    (folder / "sae.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(SAEFormatError, match="not a readable safetensors"):
        load_directory(folder)


def test_decoder_size_must_match_model(tmp_path):
    write_sparsify(tmp_path)
    with pytest.raises(SAEFormatError, match="does not match the model's hidden size 64"):
        load_sae(tmp_path, d_in=64)


def test_convert_refuses_existing_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    sae = load_directory(write_sparsify(tmp_path / "src"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    with pytest.raises(SAEFormatError, match="not empty"):
        save_sae(sae, tmp_path / "full", SAELENS)
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"

    import sae_weights.layouts as layouts

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(layouts, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_sae(sae, tmp_path / "dst", SAELENS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "src"]


def test_large_sae_is_loaded_without_a_second_copy(tmp_path):
    # A 16384 x 1024 fp32 SAE is 128 MiB; loading into bf16 must allocate only the bf16 copy
    # plus one source tensor at a time, never the whole SAE twice.
    import resource
    import subprocess
    import sys

    m, d = 16384, 1024
    folder = tmp_path / "h"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"k": 32, "num_latents": m, "d_in": d}))
    save_file({"encoder.weight": torch.randn(m, d), "encoder.bias": torch.zeros(m),
               "W_dec": torch.randn(m, d), "b_dec": torch.zeros(d)}, str(folder / "sae.safetensors"))
    code = (
        "import resource, torch, sae_weights\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"s = sae_weights.load_sae({str(folder)!r}, dtype=torch.bfloat16)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n"
    )
    grew = int(subprocess.check_output([sys.executable, "-c", code]).split()[-1])
    sae_bf16 = 2 * m * d * 2
    one_fp32_tensor = m * d * 4
    assert grew < sae_bf16 + one_fp32_tensor + 16 * 2**20, grew
    del resource


def test_convert_to_saelens_keeps_what_the_source_knows(tmp_path):
    # a SAELens source: model_name and the other metadata, and top-level fields the writer does not set
    src = write_saelens(tmp_path / "sl", arch="topk")
    raw = json.loads((src / "cfg.json").read_text())
    raw["metadata"].update({"context_size": 128, "dataset_path": "org/data", "prepend_bos": True})
    raw["d_head"] = None
    (src / "cfg.json").write_text(json.dumps(raw))
    cfg = json.loads((save_sae(load_directory(src), tmp_path / "out", SAELENS) / "cfg.json").read_text())
    assert cfg["metadata"] == {"hook_name": "blocks.3.hook_resid_post", "model_name": "tiny", "context_size": 128,
                               "dataset_path": "org/data", "prepend_bos": True, "sae_lens_version": "6.0.0"}
    assert "d_head" in cfg and cfg["k"] == 8 and cfg["architecture"] == "topk"
    # a SAELens config from before 6.0 keeps those fields at the top level: they move into metadata
    old = write_saelens(tmp_path / "old", arch="topk")
    raw = json.loads((old / "cfg.json").read_text())
    meta = raw.pop("metadata")
    raw.update({**meta, "hook_layer": 3, "sae_lens_version": "3.5.0", "rescale_acts_by_decoder_norm": False})
    (old / "cfg.json").write_text(json.dumps(raw))
    cfg = json.loads((save_sae(load_directory(old), tmp_path / "out2", SAELENS) / "cfg.json").read_text())
    assert cfg["metadata"] == {"hook_name": "blocks.3.hook_resid_post", "model_name": "tiny", "hook_layer": 3,
                               "sae_lens_version": "6.0.0"}
    assert "model_name" not in cfg and "rescale_acts_by_decoder_norm" not in cfg
    # a --hookpoint given to the conversion names the hook
    cfg = json.loads((save_sae(load_directory(src), tmp_path / "out3", SAELENS, hookpoint="blocks.4") / "cfg.json")
                     .read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.4" and cfg["metadata"]["model_name"] == "tiny"
    # sparsify's own fields (expansion_factor, ...) are not SAELens's and are not carried over
    cfg = json.loads((save_sae(load_directory(write_sparsify(tmp_path / "sp")), tmp_path / "out4", SAELENS)
                      / "cfg.json").read_text())
    assert "expansion_factor" not in cfg and cfg["metadata"]["hook_name"] == "model.layers.24"


@pytest.mark.parametrize("to", ["sparsify", "saelens"])
def test_convert_refuses_a_path_as_hookpoint_naming_the_destination(tmp_path, capsys, to):
    from lmm_steer.cli import main

    src = write_sparsify(tmp_path / "src")  # one SAE at the folder's root: --hookpoint reads nothing there
    assert main(["sae", "convert", str(src), str(tmp_path / "dst"), "--to", to, "--hookpoint", "../x"]) == 1
    err = capsys.readouterr().err
    assert "'../x'" in err and str(tmp_path / "dst") in err and str(src) not in err
    assert not (tmp_path / "dst").exists() and not (tmp_path / "x").exists()
    # a plain name is taken: it names the destination's subfolder (sparsify) or hook (SAELens)
    assert main(["sae", "convert", str(src), str(tmp_path / "ok"), "--to", to, "--hookpoint", "model.layers.7"]) == 0
    assert detect_layout(tmp_path / "ok" / "model.layers.7" if to == "sparsify" else tmp_path / "ok") == to
