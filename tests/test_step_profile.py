import pytest
import torch

from lmm_steer.step_profile import kernel_breakdown, kernel_kind, markdown, profile_replays


@pytest.mark.parametrize("name, kind", [
    ("nvjet_hsh_128x64_64x4_1x2_h_bz_coopA_NTN", "gemm"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, 128, 16, 4, 4>", "gemm"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)", "attention"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "fused (compiled)"),
    ("void at::native::sbtopk::gatherTopK<c10::BFloat16, unsigned int, 2, false>", "top-k / sort"),
    ("void at::native::index_elementwise_kernel<128, 4>", "index / scatter"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>", "elementwise"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>", "reduce / norm"),
    ("Memset (Device)", "copy / fill"),
    ("void at::native::roll_cuda_kernel<float>", "other"),
])
def test_kernel_kinds(name, kind):
    assert kernel_kind(name) == kind


def _kernels(step_start, gap):
    """One step of four kernels, ``gap`` microseconds apart."""
    out, t = [], step_start
    for name, dur in (("nvjet_gemm_a", 100.0), ("triton_poi_fused_add_0", 5.0), ("fmha_kernel", 10.0),
                      ("nvjet_gemm_a", 40.0)):
        out.append({"ph": "X", "cat": "kernel", "name": name, "ts": t, "dur": dur})
        t += dur + gap
    return out, t


def test_breakdown_splits_each_step_into_busy_time_gaps_and_kinds():
    first, t = _kernels(1000.0, 2.0)
    second, _ = _kernels(t, 2.0)
    host = [{"ph": "X", "cat": "cpu_op", "name": "cudaGraphLaunch", "ts": 900.0, "dur": 500.0},
            {"ph": "i", "cat": "kernel", "name": "instant", "ts": 950.0}]
    p = kernel_breakdown(host + first + second, steps=2)
    assert p["kernels_per_step"] == 4
    assert p["busy_us"] == pytest.approx(155.0)
    # seven gaps of 2 us in two steps (the last kernel's end closes the span)
    assert p["gap_us"] == pytest.approx(7.0)
    assert p["span_us"] == pytest.approx(p["busy_us"] + p["gap_us"])
    assert p["kinds_us"] == {"gemm": 140.0, "attention": 10.0, "fused (compiled)": 5.0}
    assert list(p["kinds_us"]) == ["gemm", "attention", "fused (compiled)"]  # largest first
    assert p["kinds_count"]["gemm"] == 2
    assert p["top_kernels"][0] == {"name": "nvjet_gemm_a", "us": 140.0, "count": 2.0}
    table = markdown({"no SAE, batch 1": p})
    # columns: the figures, then only the kinds present, in KERNEL_KINDS order
    assert table[0] == "| step profile, us per step | kernels | span | busy | gaps | fused (compiled) | attention | gemm |"
    assert table[2] == "| no SAE, batch 1 | 4 | 162 | 155 | 7 | 5 | 10 | 140 |"


def test_breakdown_without_kernels_says_so():
    with pytest.raises(ValueError, match="no kernels"):
        kernel_breakdown([{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 1.0}], steps=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel traces need a GPU")
def test_profile_of_a_captured_graph_counts_its_kernels():
    x = torch.randn(64, 64, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = (x @ x).relu() + 1.0  # noqa: F841 - the graph's output stays alive with the graph
    p = profile_replays(graph.replay, steps=5)
    assert p["kernels_per_step"] >= 2 and p["busy_us"] > 0 and p["gap_us"] >= 0
