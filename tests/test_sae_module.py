import pytest
import torch
import torch.nn.functional as F

from sae_weights import SAEConfig, SparseAutoencoder, random_topk_sae


def _random_sae(activation, d=16, m=64, k=6, apply_b_dec=True):
    sae = SparseAutoencoder(SAEConfig(d_in=d, num_latents=m, activation=activation,
                                      k=k if activation == "topk" else None, apply_b_dec_to_input=apply_b_dec))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        if sae.threshold is not None:
            sae.threshold.uniform_(0, 1)
    return sae


def test_topk_matches_paper_formula():
    sae = _random_sae("topk")
    x = torch.randn(5, 16)
    pre = F.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    vals, idx = pre.topk(6, dim=-1)
    z_ref = torch.zeros_like(pre).scatter(-1, idx, vals)
    z = sae.encode(x)
    torch.testing.assert_close(z, z_ref)
    assert ((z != 0).sum(-1) <= 6).all()
    torch.testing.assert_close(sae.decode(z), z_ref @ sae.W_dec + sae.b_dec)
    v, i = sae.encode_sparse(x)
    torch.testing.assert_close(sae.decode_sparse(v, i), sae.decode(z), rtol=1e-5, atol=1e-5)


def test_jumprelu_and_relu_formulas():
    x = torch.randn(7, 16)
    j = _random_sae("jumprelu", apply_b_dec=False)
    pre = x @ j.W_enc.T + j.b_enc
    torch.testing.assert_close(j.encode(x), F.relu(pre) * (pre > j.threshold))
    r = _random_sae("relu")
    torch.testing.assert_close(r.encode(x), F.relu((x - r.b_dec) @ r.W_enc.T + r.b_enc))
    with pytest.raises(ValueError, match="explicit k"):
        r.encode_sparse(x)
    v, i = r.encode_sparse(x, k=3)
    assert v.shape == i.shape == (7, 3)
    torch.testing.assert_close(v, r.encode(x).gather(-1, i))


@pytest.mark.parametrize("activation", ["topk", "jumprelu", "relu"])
def test_feature_activations_equal_dense_columns(activation):
    sae = _random_sae(activation)
    x = torch.randn(3, 9, 16)
    ids = [0, 5, 17, 63]
    torch.testing.assert_close(sae.feature_activations(x, ids), sae.encode(x)[..., ids])
    torch.testing.assert_close(sae.decoder_directions(ids), sae.W_dec[ids])


def test_feature_ids_out_of_range_rejected():
    sae = _random_sae("topk")
    with pytest.raises(IndexError, match=r"\[64\]"):
        sae.decoder_directions([1, 64])


def test_random_topk_is_seeded_and_unit_norm():
    a, b = random_topk_sae(32, 128, 4, seed=3), random_topk_sae(32, 128, 4, seed=3)
    torch.testing.assert_close(a.W_dec, b.W_dec)
    assert not torch.equal(a.W_dec, random_topk_sae(32, 128, 4, seed=4).W_dec)
    torch.testing.assert_close(a.W_dec.norm(dim=1), torch.ones(128))


def test_config_rejects_bad_k():
    with pytest.raises(ValueError, match="k"):
        SAEConfig(d_in=4, num_latents=8, activation="topk", k=9)
