"""SAE training, activation collection and the automatic catalog, on builtin tiny models."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lmm_steer.models.builtin import _CORPUS
from lmm_steer.training.sparse_ops import SparseDecode, TopKEncode, row_topk
from lmm_steer.training.trainer import SAETrainer, TrainConfig, train
from sae_weights import load_sae


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "lmm_steer.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    lines = [s.strip() + "." for s in _CORPUS.replace("\n", " ").split(".") if s.strip()]
    path.write_text("\n".join(lines * 6) + "\n")
    return path


def test_sparse_backward_equals_dense_autograd():
    torch.manual_seed(0)
    b, d, m, k = 37, 24, 96, 5
    x = torch.randn(b, d, dtype=torch.float64)
    w_enc = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(m, dtype=torch.float64, requires_grad=True)
    w_dec = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    target = torch.randn(b, d, dtype=torch.float64)
    dead = torch.zeros(m, dtype=torch.bool)
    dead[::3] = True

    vals, idx, aux_vals, aux_idx, _ = TopKEncode.apply(x, w_enc, b_enc, k, dead, 4)
    loss = ((SparseDecode.apply(vals, idx, w_dec) - target) ** 2).sum() + SparseDecode.apply(aux_vals, aux_idx,
                                                                                              w_dec).pow(2).sum()
    loss.backward()
    ours = [t.grad.clone() for t in (w_enc, b_enc, w_dec)]
    for t in (w_enc, b_enc, w_dec):
        t.grad = None

    pre = F.relu(x @ w_enc.T + b_enc)
    sel = torch.zeros_like(pre).scatter(1, pre.topk(k, dim=1).indices, 1.0)
    aux_pre = pre.masked_fill(~dead, float("-inf"))
    aux_sel = torch.zeros_like(pre).scatter(1, aux_pre.topk(4, dim=1).indices, 1.0)
    ref = ((pre * sel) @ w_dec - target).pow(2).sum() + ((pre * aux_sel) @ w_dec).pow(2).sum()
    ref.backward()
    for a, r in zip(ours, (w_enc.grad, b_enc.grad, w_dec.grad), strict=True):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("b,m,k", [(7, 96, 5), (16, 32768, 32), (16, 32768, 128), (5, 1000, 10), (9, 4096, 64)])
def test_row_topk_selects_what_torch_topk_selects(b, m, k):
    """The group-pruned top-k returns the same values as torch.topk, with distinct indices that
    point at them, also with ties and rows that are mostly -inf (the AuxK mask)."""
    g = torch.Generator().manual_seed(m + k)
    x = torch.randn(b, m, generator=g)
    x[0, ::2] = float("-inf")
    x[1] = torch.randint(0, 4, (m,), generator=g).float()
    for slab_bytes in (64 << 20, 3 * m * 4):  # whole, and in row slabs of 3 (the last one shorter)
        vals, idx = row_topk(x, k, slab_bytes=slab_bytes)
        torch.testing.assert_close(vals.sort(-1).values, x.topk(k, dim=-1).values.sort(-1).values, rtol=0, atol=0)
        assert torch.equal(x.gather(-1, idx), vals)
        assert all(len(set(row.tolist())) == k for row in idx)


@pytest.mark.parametrize("text,msg", [
    ('{"text": "fine"}\n{oops\n', r"d.jsonl:2: not valid JSON"),
    ('\n"a text line"\n', r"d.jsonl:2: expected an object"),
    ('{"caption": "x"}\n', r"d.jsonl:1: expected 'conversations', 'messages' or 'text'"),
])
def test_jsonl_data_errors_name_file_and_line(tmp_path, text, msg):
    from lmm_steer.training.data import iter_examples

    path = tmp_path / "d.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=msg):
        list(iter_examples(str(path)))


def test_wordnet_source_parses_glosses_and_samples_every_topic_from_the_start(tmp_path):
    from lmm_steer.training.data import iter_examples

    # WordNet's data files hold synsets grouped by topic (the lexicographer file, field 2)
    def synset(offset, lexfile, word, gloss):
        return f"{offset:08d} {lexfile:02d} n 01 {word} 0 000 | {gloss}\n"

    lines = ["  1 This software and database is being provided ...\n"]
    lines += [synset(i, 4, f"act_{i}", f"an act numbered {i}") for i in range(60)]
    lines += [synset(100 + i, 5, f"animal_{i}(a)", f"an animal numbered {i}") for i in range(60)]
    (tmp_path / "data.noun").write_text("".join(lines))
    examples = list(iter_examples(f"wordnet:{tmp_path}"))
    texts = [e.messages[0]["content"][0]["text"] for e in examples]
    glosses = [g for t in texts for g in t.split("\n")]
    assert len(examples) == 20 and all(len(t.split("\n")) == 6 for t in texts)
    # every synset once, underscores as spaces, the adjective marker dropped, the licence skipped
    assert sorted(glosses) == sorted([f"act {i}: an act numbered {i}" for i in range(60)]
                                     + [f"animal {i}: an animal numbered {i}" for i in range(60)])
    # a short budget (the first 2 conversations) already mixes both topics, and runs repeat
    first = "\n".join(texts[:2])
    assert "act " in first and "animal " in first
    assert texts == [e.messages[0]["content"][0]["text"] for e in iter_examples(f"wordnet:{tmp_path}")]


def _synthetic(n=20000, d=48, true_features=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(true_features, d, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    codes = torch.zeros(n, true_features)
    codes.scatter_(1, torch.randint(0, true_features, (n, 4), generator=g), torch.rand(n, 4, generator=g) * 3)
    return codes @ feats + 0.3


def _batches(data, size):
    def batches(step):
        return data[torch.randint(0, data.shape[0], (size,), generator=torch.Generator().manual_seed(step))]
    return batches


def test_resume_equals_uninterrupted(tmp_path):
    data = _synthetic()
    cfg = TrainConfig(num_latents=256, k=8, batch_size=512, steps=60, warmup_steps=10, dead_tokens=2000, seed=3)
    straight = SAETrainer(cfg, 48)
    train(straight, _batches(data, 512), progress=False)

    first = SAETrainer(cfg, 48)
    while first.step < 30:
        first.train_step(_batches(data, 512)(first.step))
    first.save(tmp_path / "ckpt")
    resumed = SAETrainer(cfg, 48)
    resumed.load(tmp_path / "ckpt")
    assert resumed.step == 30
    train(resumed, _batches(data, 512), progress=False)
    for a, b in zip(straight.params, resumed.params, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(straight.since_fired, resumed.since_fired)


def test_auxk_trains_dead_latents_and_only_with_auxk():
    """A latent counted dead, with positive pre-activations that never make the top k, is moved
    by the AuxK loss (as in sparsify) and left alone without it."""
    data = _synthetic(n=4000)
    moved = {}
    for alpha in (1 / 32, 0.0):
        tr = SAETrainer(TrainConfig(num_latents=2048, k=2, batch_size=128, steps=3, warmup_steps=1, dead_tokens=1,
                                    seed=2, auxk_alpha=alpha), 48)
        tr.train_step(_batches(data, 128)(0))  # every latent that did not fire is now dead
        dead = (tr.since_fired >= 1).nonzero()[:, 0]
        before = tr.sae.W_dec[dead].clone()
        tr.train_step(_batches(data, 128)(1))
        silent = tr.since_fired[dead] >= 2 * 128  # did not fire in the main top k of either step
        changed = (tr.sae.W_dec[dead] - before).abs().amax(1) > 1e-5  # beyond renormalisation rounding
        moved[alpha] = int((changed & silent).sum())
        assert len(dead) > 0
    assert moved[1 / 32] > 0 and moved[0.0] == 0
    torch.testing.assert_close(tr.sae.W_dec.norm(dim=1), torch.ones(2048))


def test_train_command_on_a_builtin_model_lowers_fvu_and_serves(corpus, tmp_path):
    out = tmp_path / "sae"
    r = _cli("sae", "train", "--model", "builtin:tiny-llama", "--hookpoint", "model.layers.2", "--data", str(corpus),
             "--tokens", "6000", "--latents", "256", "--k", "16", "--batch", "512", "--steps", "300",
             "--warmup", "20", "--dead-tokens", "20000", "--out", str(out), "--eval-every", "150",
             "--eval-examples", "4", "--log-every", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    log = [json.loads(line) for line in (tmp_path / "sae.log.jsonl").read_text().splitlines()]
    assert summary["fvu"] < 0.25, summary  # bound for this setup: 300 steps, 256 latents, k 16
    assert summary["fvu"] < 0.5 * log[0]["fvu"]  # training, not the initialisation, got it there
    assert summary["l0"] <= 16 and 0 <= summary["dead_share"] < 0.5
    # a random-weight model: the splice may move its loss either way, but only a little at this FVU
    assert abs(summary["ce_spliced"] - summary["ce_clean"]) < 0.5 and summary["kl"] >= 0
    assert any("kl" in row for row in log)
    # the checkpoint is the sparsify layout the server loads directly
    sae = load_sae(out, hookpoint="model.layers.2")
    assert (sae.num_latents, sae.k, sae.d_in) == (256, 16, 64)
    from lmm_steer.engine import FeatureEdit, GenerationRequest, SamplingParams, SteeringSpec
    from lmm_steer.engine.factory import build_engine

    engine = build_engine("builtin:tiny-llama", str(out), hookpoint="model.layers.2")
    res = engine.generate([GenerationRequest(messages=[{"role": "user", "content": "hi"}],
                                             steering=SteeringSpec([FeatureEdit(3, 20.0)]),
                                             sampling=SamplingParams(max_tokens=4, ignore_eos=True))])[0]
    assert len(res.token_ids) == 4


def test_activation_cache_is_reused(corpus, tmp_path):
    from lmm_steer.models.loader import load_model
    from lmm_steer.training.activations import collect
    from lmm_steer.training.data import iter_examples

    lm = load_model("builtin:tiny-llama")
    key = {"data": str(corpus)}
    first = collect(lm, 2, iter_examples(str(corpus)), 1000, cache_dir=tmp_path / "c", cache_key=key)
    assert first.shape == (1000, 64) and (tmp_path / "c" / "manifest.json").exists()
    again = collect(lm, 2, iter(()), 1000, cache_dir=tmp_path / "c", cache_key=key)  # no data: from disk
    assert torch.equal(first, again)
    assert collect(lm, 2, iter_examples(str(corpus)), 500, cache_dir=tmp_path / "c",
                   cache_key={"data": "other"}).shape == (500, 64)


def test_two_process_gloo_ranks_end_identical(corpus, tmp_path):
    out = tmp_path / "ddp"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",  # a free port
         "-m", "lmm_steer.cli", "sae", "train", "--model", "builtin:tiny-llama", "--hookpoint", "model.layers.2",
         "--data", str(corpus), "--tokens", "4000", "--latents", "128", "--k", "8", "--batch", "256",
         "--steps", "40", "--warmup", "5", "--out", str(out), "--quiet", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-5000:]  # the launcher's own report is ~2000 characters of it
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 40
    assert len(summary["rank_digests"]) == 2 and summary["rank_digests"][0] == summary["rank_digests"][1]
    assert summary["tokens"] == 40 * 256


def test_catalog_text_and_images(corpus, tmp_path):
    from PIL import Image

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 48), (80 * i, 40, 200 - 60 * i)).save(images / f"img{i}.png")
    (images / "img0.txt").write_text("A blue square.")
    for data, model in ((str(corpus), "builtin:tiny-llama"), (str(images), "builtin:tiny-llava-next")):
        out = tmp_path / f"{model.split(':')[1]}.jsonl"
        r = _cli("sae", "catalog", "--model", model, "--sae", "builtin:random-topk:latents=128,k=8",
                 "--hookpoint", "model.layers.2", "--data", data, "--out", str(out), "--examples", "40",
                 "--top", "3")
        assert r.returncode == 0, r.stderr
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [row["feature"] for row in rows] == list(range(128))
        assert all(0 <= row["density"] <= 1 and row["max_activation"] >= 0 for row in rows)
        active = [row for row in rows if row["density"] > 0]
        assert active
        if model == "builtin:tiny-llama":
            assert all(len(row["top_contexts"]) <= 3 for row in rows)
            ctx = [c for row in active for c in row["top_contexts"]]
            assert ctx and all("«" in c["text"] and "»" in c["text"] for c in ctx)
            acts = [c["activation"] for c in active[0]["top_contexts"]]
            assert acts == sorted(acts, reverse=True)
        else:
            imgs = [im for row in active for im in row.get("top_images", [])]
            assert imgs and all(len(im["grid"]) == 4 and len(im["grid"][0]) == 4 for im in imgs)
            assert all(im["image"].endswith(".png") for im in imgs)


def test_gradient_buffers_receive_the_same_gradients():
    torch.manual_seed(1)
    x = torch.randn(20, 16)
    w_enc, b_enc, w_dec = torch.randn(64, 16), torch.randn(64), torch.randn(64, 16)
    target = torch.randn(20, 16)
    grads = []
    for buffers, overwrite in ((False, False), (True, False), (True, True)):
        params = [t.clone().requires_grad_() for t in (w_enc, b_enc, w_dec)]
        enc_buf = torch.full_like(w_enc, 7.0) if buffers else None  # overwritten, whatever it held
        # accumulated into, or overwritten whatever it held
        dec_buf = (torch.full_like(w_dec, 5.0) if overwrite else torch.zeros_like(w_dec)) if buffers else None
        vals, idx, _, _, layout = TopKEncode.apply(x, params[0], params[1], 4, None, 0, None, enc_buf)
        ((SparseDecode.apply(vals, idx, params[2], dec_buf, layout, overwrite) - target) ** 2).sum().backward()
        grads.append([enc_buf if buffers else params[0].grad, params[1].grad, dec_buf if buffers else params[2].grad])
    for got in grads[1:]:
        for a, b in zip(got, grads[0], strict=True):
            torch.testing.assert_close(a, b)


def test_bench_train_reports_ratios_and_memory_it_measured(tmp_path):
    out = tmp_path / "bench.json"
    r = _cli("sae", "bench-train", "--d-in", "64", "--latents", "2048", "--batch", "512", "--k", "8,32",
             "--steps", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["k"] for row in rows] == [8, 32]
    table = {int(line.split("|")[1]): float(line.split("|")[4]) for line in r.stdout.splitlines()
             if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    for row in rows:
        assert row["step_s"] > 0 and row["matmul_s"] > 0
        assert row["ratio"] == pytest.approx(row["matmul_s"] / row["step_s"])
        assert table[row["k"]] == pytest.approx(row["ratio"], abs=5e-4)  # the printed table is the JSON's
        assert row["sae_param_bytes"] == (2 * 2048 * 64 + 2048 + 64) * 4
        assert row["pre_activation_bytes"] == 512 * 2048 * 4
    report = json.loads(out.read_text())
    assert report["training_peak_bytes"] >= 0
    # the machine the ratio belongs to is part of the record, and printed with the table
    assert report["machine"]["isa"] == torch.backends.cpu.get_cpu_capability()
    assert report["machine"]["threads"] == torch.get_num_threads()
    assert f"({report['machine']['isa']})" in r.stdout and report["machine"]["cpu"] in r.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_training_with_bf16_autocast_lowers_fvu_and_matches_cpu_gradients():
    data = _synthetic(n=8000)
    cfg = TrainConfig(num_latents=512, k=8, batch_size=512, steps=120, warmup_steps=10, dead_tokens=5000, seed=4)
    gpu = SAETrainer(cfg, 48, device="cuda")
    log = train(gpu, lambda step: _batches(data, 512)(step).cuda(), progress=False)
    assert log[-1]["fvu"] < 0.6 * log[0]["fvu"]
    torch.testing.assert_close(gpu.sae.W_dec.norm(dim=1), torch.ones(512, device="cuda"))
    # one step's sparse gradients on the GPU (fp32 inputs, no autocast) equal the CPU's
    torch.manual_seed(0)
    x = torch.randn(64, 48)
    w_enc, b_enc, w_dec = torch.randn(128, 48), torch.randn(128), torch.randn(128, 48)
    grads = []
    for dev in ("cpu", "cuda"):
        p = [t.detach().to(dev).requires_grad_() for t in (w_enc, b_enc, w_dec)]
        vals, idx, _, _, _ = TopKEncode.apply(x.to(dev), p[0], p[1], 4, None, 0)
        (SparseDecode.apply(vals, idx, p[2]) ** 2).sum().backward()
        grads.append([t.grad.cpu() for t in p])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def _dense_loss(x, w_enc, b_enc, w_dec, b_dec, k, dead, auxk_alpha):
    """The loss the trainer documents, by dense autograd: FVU, plus auxk_alpha x the AuxK FVU of the
    top min(d/2, dead) dead latents predicting the main reconstruction's residual."""
    pre = F.relu((x - b_dec) @ w_enc.T + b_enc)
    z = torch.zeros_like(pre).scatter(1, pre.topk(k, dim=1).indices, pre.topk(k, dim=1).values)
    err = z @ w_dec + b_dec - x
    loss = err.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    n_dead = int(dead.sum())
    if auxk_alpha and n_dead:
        k_aux = min(x.shape[1] // 2, n_dead)
        aux_pre = pre.masked_fill(~dead, float("-inf"))
        top = aux_pre.topk(k_aux, dim=1)
        z_aux = torch.zeros_like(pre).scatter(1, top.indices, top.values.clamp_min(0))
        residual = err.detach()
        aux = (z_aux @ w_dec + residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
        loss = loss + auxk_alpha * aux
    return loss


@pytest.mark.parametrize("auxk_alpha", [0.0, 1 / 32])
def test_step_gradients_equal_dense_autograd_of_the_documented_loss(auxk_alpha):
    """Every parameter's gradient, b_dec's encoder-input path included, equals autograd's."""
    d, m, k = 64, 512, 8
    data = _synthetic(n=2000, d=d)
    x = data[:256]
    tr = SAETrainer(TrainConfig(num_latents=m, k=k, batch_size=256, dead_tokens=100, seed=5, auxk_alpha=auxk_alpha), d)
    tr.since_fired[::3] = 1000  # a third of the latents count as dead
    dead = tr.since_fired >= 100
    tr.gradients(x)
    ours = [p.grad.clone() for p in tr.params]
    ref = [p.detach().clone().double().requires_grad_() for p in tr.params]
    _dense_loss(x.double(), *ref, k, dead, auxk_alpha).backward()
    for name, a, r in zip(("W_enc", "b_enc", "W_dec", "b_dec"), ours, ref, strict=True):
        rel = float((a.double() - r.grad).norm() / r.grad.norm())
        assert rel < 1e-5, f"{name}: relative error {rel:.2e}"


@pytest.mark.parametrize("slab", [None, 7])
def test_schedule_free_sign_equals_schedulefree_wrapping_sign_sgd(slab):
    """Our schedule-free sign descent takes the iterates of the library sparsify uses, step for step
    (up to rounding: our update is fused)."""
    schedulefree = pytest.importorskip("schedulefree", reason="the reference library (the bench extra)")
    from lmm_steer.training.schedule_free import ScheduleFreeSign

    class SignSGD(torch.optim.Optimizer):
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(p.grad.sign(), alpha=-group["lr"])

    torch.manual_seed(0)
    a = torch.randn(10, 5, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    with torch.no_grad():  # a data-dependent change before the first step (as b_dec's initialisation)
        a += 1.0
        b += 1.0
    lib = schedulefree.ScheduleFreeWrapper(SignSGD([a], lr=0.01), momentum=0.95)
    lib.train()
    ours = ScheduleFreeSign([b], 0.01, 0.95, slab=slab)  # 7: slabs that split rows
    target = torch.randn(10, 5)
    for _ in range(40):
        for p in (a, b):
            p.grad = None
            ((p - target) ** 3).sum().backward()
        lib.step()
        ours.step()
        torch.testing.assert_close(a, b)


def test_bench_quality_scores_a_trainer_against_the_true_dictionary(tmp_path):
    """The scores are measured against the stream's truth: the true dictionary scores perfectly,
    a random one does not, and a short run of the trainer learns some of the atoms."""
    from lmm_steer.training.quality import DictionaryStream, scores, topk_sae, train_ours

    stream = DictionaryStream(d=32, atoms=64, active=2, seed=3)
    atoms = stream.dictionary
    # the true atoms as encoder and decoder, centred on the offset: every atom found exactly
    truth = scores(stream, topk_sae(atoms, torch.zeros(64), atoms, stream.offset * stream.scale, k=2))
    assert truth["recovery"] == pytest.approx(1.0) and truth["recovered_share"] == 1.0
    assert truth["precision"] == pytest.approx(1.0)
    rand = torch.nn.functional.normalize(torch.randn(64, 32, generator=torch.Generator().manual_seed(9)), dim=1)
    random_scores = scores(stream, topk_sae(rand, torch.zeros(64), rand, torch.zeros(32), k=2))
    assert random_scores["recovery"] < 0.8 and random_scores["recovered_share"] < 0.1
    trained = train_ours(stream, latents=128, k=4, batch=512, steps=150)
    assert trained["recovery"] > random_scores["recovery"] + 0.1
    assert trained["fvu"] < 0.5 and trained["l0"] <= 4

    out = tmp_path / "q.json"
    r = _cli("sae", "bench-quality", "--d-in", "16", "--atoms", "32", "--active", "2", "--latents", "64", "--k", "4",
             "--batch", "256", "--tokens", "5120", "--json", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["steps"] == 20 and "lmm-steer" in report["rows"]
    assert "| lmm-steer |" in r.stdout


def test_splice_loss_scores_text_targets_only(tmp_path):
    """Image placeholders are no text to predict: with an identity splice the clean loss is the
    mean over the text targets, and the delta is zero."""
    from PIL import Image

    from lmm_steer.engine.prefill import image_token_id
    from lmm_steer.models.inputs import build_inputs
    from lmm_steer.models.loader import load_model
    from lmm_steer.training.activations import splice_eval
    from lmm_steer.training.data import Example

    loaded = load_model("builtin:tiny-llava-next")
    image_id = loaded.model.config.image_token_index
    assert image_token_id(loaded.model) == image_id
    assert image_token_id(load_model("builtin:tiny-llama").model) is None
    Image.new("RGB", (64, 48), (200, 40, 90)).save(tmp_path / "a.png")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}]

    class Identity(torch.nn.Module):
        W_dec = torch.zeros(1)

        def forward(self, x):
            return x

    scores = splice_eval(loaded, 1, Identity(), [Example(messages, [str(tmp_path / "a.png")])])
    inputs = build_inputs(loaded, messages, [Image.open(tmp_path / "a.png").convert("RGB")])
    with torch.no_grad():
        logits = loaded.model(**inputs).logits[0, :-1].float()
    target = inputs["input_ids"][0, 1:]
    text = target != image_id
    assert (~text).sum() > text.sum() > 0  # the image dominates the sequence
    want = float(F.cross_entropy(logits[text], target[text]))
    assert scores["ce_clean"] == pytest.approx(want, rel=1e-4)
    assert scores["ce_delta"] == pytest.approx(0.0, abs=1e-5)
