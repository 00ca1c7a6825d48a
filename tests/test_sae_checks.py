"""SAE files: `sae info` checks what the loader checks, SAELens's own rules are followed, writes
stay where they belong, and an unresponsive or gated hub gets the project's own message."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from safetensors.torch import save_file

from sae_weights import SAEFormatError, load_directory, read_config
from sae_weights.layouts import saelens_version

from sae_files import write_saelens, write_sparsify


def _cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "lmm_steer.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=timeout)


def _one_line_error(out, *needles):
    assert out.returncode == 1, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmm-steer: error: "), out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- sae info refuses what the loader refuses, in one line ------------------------------------------

def _broken(tmp_path, kind):
    folder = write_sparsify(tmp_path, hook="h")
    weights = folder / "sae.safetensors"
    if kind == "d_in mismatch":
        cfg = json.loads((folder / "cfg.json").read_text())
        (folder / "cfg.json").write_text(json.dumps({**cfg, "d_in": 64}))
    elif kind == "NaN weights":
        write_sparsify(tmp_path, hook="h", tensors={"b_dec": torch.full((32,), float("nan"))})
    elif kind == "extra W_skip":
        write_sparsify(tmp_path, hook="h", tensors={"W_skip": torch.zeros(32, 32)})
    elif kind == "missing W_dec":
        write_sparsify(tmp_path, hook="h", tensors={"W_dec": None})
    elif kind == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "garbage":
        weights.write_bytes(os.urandom(4096))
    elif kind == "k above num_latents":
        cfg = json.loads((folder / "cfg.json").read_text())
        (folder / "cfg.json").write_text(json.dumps({**cfg, "k": 500}))
    return folder


BROKEN = {"d_in mismatch": "implies", "NaN weights": "NaN", "extra W_skip": "unexpected tensors ['W_skip']",
          "missing W_dec": "missing tensors ['W_dec']", "truncated": "sae.safetensors",
          "garbage": "not a readable safetensors file", "k above num_latents": "k=500"}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_sae_info_refuses_what_the_loader_refuses(tmp_path, kind):
    folder = _broken(tmp_path, kind)
    with pytest.raises(SAEFormatError):
        load_directory(folder)
    _one_line_error(_cli("sae", "info", str(folder)), BROKEN[kind])


def test_sae_info_on_a_sound_checkpoint(tmp_path):
    out = _cli("sae", "info", str(write_sparsify(tmp_path, hook="h")))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["dtype"] == "float32"


# -- SAELens rules -----------------------------------------------------------------------------------------

def _edit_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))


def test_a_saelens_6_config_without_architecture_is_refused(tmp_path):
    folder = write_saelens(tmp_path / "v6", arch="standard")
    _edit_cfg(folder, architecture=None, metadata={"hook_name": "h", "sae_lens_version": "6.5.0"})
    with pytest.raises(SAEFormatError, match="without 'architecture'"):
        read_config(folder)
    # no version: SAELens reads it as a pre-6.0 config, whose architecture defaulted to standard
    legacy = write_saelens(tmp_path / "legacy", arch="standard")
    _edit_cfg(legacy, architecture=None, metadata=None, hook_point="blocks.3.hook_resid_post")
    _, cfg, _ = read_config(legacy)
    assert cfg.activation == "relu" and cfg.hookpoint == "blocks.3.hook_resid_post"


def _saelens_reference(t, x, k, apply_b_dec):
    """SAELens 6's TopKSAE with rescale_acts_by_decoder_norm, written out from its definition."""
    norms = t["W_dec"].norm(dim=-1)
    pre = ((x - t["b_dec"]) if apply_b_dec else x) @ t["W_enc"] + t["b_enc"]
    pre = pre * norms
    top = torch.topk(pre, k, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    return acts, (acts / norms) @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_rescale_acts_by_decoder_norm_is_served_exactly(tmp_path, apply_b_dec):
    from safetensors.torch import load_file

    folder = write_saelens(tmp_path / "s", arch="topk", apply_b_dec=apply_b_dec)
    _edit_cfg(folder, rescale_acts_by_decoder_norm=True)
    t = load_file(str(folder / "sae_weights.safetensors"))
    assert not torch.allclose(t["W_dec"].norm(dim=-1), torch.ones(128))  # the general case: rows not unit
    sae = load_directory(folder)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    want_acts, want_out = _saelens_reference(t, x, 8, apply_b_dec)
    acts = sae.encode(x)
    torch.testing.assert_close(acts, want_acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(acts), want_out, rtol=1e-5, atol=1e-5)
    # with unit decoder rows (what SAELens's trainer writes) the rescale changes nothing
    unit = write_saelens(tmp_path / "u", arch="topk")
    t = load_file(str(unit / "sae_weights.safetensors"))
    t["W_dec"] = t["W_dec"] / t["W_dec"].norm(dim=-1, keepdim=True)
    save_file(t, str(unit / "sae_weights.safetensors"))
    plain = load_directory(unit)
    _edit_cfg(unit, rescale_acts_by_decoder_norm=True)
    torch.testing.assert_close(load_directory(unit).encode(x), plain.encode(x))


def test_convert_to_saelens_writes_its_version(tmp_path):
    src = write_sparsify(tmp_path / "src", hook="model.layers.3")
    out = _cli("sae", "convert", str(src), str(tmp_path / "sl"), "--to", "saelens")
    assert out.returncode == 0, out.stderr
    raw = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert saelens_version(raw).major >= 6 and raw["metadata"]["hook_name"] == "model.layers.3"
    assert read_config(tmp_path / "sl")[1].hookpoint == "model.layers.3"


@pytest.mark.parametrize("hook", ["../escaped", "a/b", ".."])
def test_convert_refuses_a_hookpoint_that_is_a_path(tmp_path, hook):
    (tmp_path / "work").mkdir()
    out = _cli("sae", "convert", "builtin:random-topk:d_in=32", str(tmp_path / "work" / "dst"), "--to", "sparsify",
               "--hookpoint", hook)
    _one_line_error(out, "one plain name")
    assert [p.name for p in tmp_path.rglob("*")] == ["work"]  # nothing written, inside or out
    # reading: a hookpoint names a subfolder of the source, never a way out of it
    src = write_sparsify(tmp_path / "src", hook="model.layers.3")
    out = _cli("sae", "info", str(src.parent), "--hookpoint", "../src")
    _one_line_error(out, "not climb out")


# -- the hub: no answer, gated -----------------------------------------------------------------------------

def test_a_hub_that_never_answers_times_out(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held = []

    def accept_and_hold():
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_and_hold, daemon=True).start()
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{listener.getsockname()[1]}",
           "HF_HUB_CACHE": str(tmp_path / "hub")}
    t0 = time.time()
    try:
        out = _cli("sae", "info", "org/name", "--hub-timeout", "2", env=env, timeout=60)
    finally:
        listener.close()
        for c in held:
            c.close()
    _one_line_error(out, "org/name", "no answer within 2 s")
    assert time.time() - t0 < 30
    assert held  # the hub was asked


def test_a_gated_repo_is_said_to_need_a_token(tmp_path):
    class Gated(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to model org/name is restricted.")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_HEAD = do_GET

        def log_message(self, *a):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Gated)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{httpd.server_address[1]}",
           "HF_HUB_CACHE": str(tmp_path / "hub")}
    try:
        out = _cli("sae", "info", "org/name", "--hub-timeout", "20", env=env, timeout=60)
    finally:
        httpd.shutdown()
    _one_line_error(out, "gated", "token")
