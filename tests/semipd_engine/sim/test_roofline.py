"""The GPU roofline cost model: hand-computed layer costs, monotonicity, TP, validation, decode fast-forward."""

from __future__ import annotations

import pytest

from semipd_engine.sim.batch import BaseCostModel, BatchShape, CostModel
from semipd_engine.sim.hardware import GiB, Hardware, hardware_names
from semipd_engine.sim.roofline import ACTIVATION_RESERVE_BYTES, RooflineCostModel
from semipd_engine.sim.shapes import ModelShape

L3_8B = ModelShape.preset("llama3-8b")


def model(name="llama3-8b", hw="a100-80g", tp=1, **kw):
    return RooflineCostModel(ModelShape.preset(name), Hardware.preset(hw), tp=tp, **kw)


def test_batch_shape_of_classifies_sequences():
    s = BatchShape.of([(0, 100, True), (50, 20, False), (99, 1, True), (0, 1, True), (10, 1, False)])
    assert s.prefill_seqs == 3 and s.prefill_tokens == 121
    assert s.prefill_attn_pairs == 100 * 50.5 + 20 * (50 + 10.5) + 1 * 1
    assert s.prefill_kv_tokens == 100 + 70 + 1
    assert s.decode_seqs == 2 and s.decode_ctx_tokens == 100 + 11
    assert s.sampled == 3 and s.num_tokens == 123
    with pytest.raises(ValueError):
        BatchShape.of([(0, 0, True)])


def _roof(flops, peak, ceff, nbytes, bw, beff, floor):
    return max(flops / (peak * ceff), nbytes / (bw * beff), floor)


def test_one_llama3_8b_layer_on_a100_by_hand():
    hw = Hardware.preset("a100-80g")
    m = RooflineCostModel(L3_8B, hw)
    P, BW = 312e12, 2.039e12
    assert (hw.peak_flops, hw.mem_bw) == (P, BW)
    h, H, KV, d, inter, b, L = 4096, 32, 8, 128, 14336, 2, 32

    def gemm(mm, n, k):
        flops, nbytes = 2 * mm * n * k, b * (mm * k + k * n + mm * n)
        return _roof(flops, P, hw.gemm_compute_eff(mm), nbytes, BW, hw.gemm_bw_eff(nbytes), hw.gemm_floor_s)

    def ew(nbytes):
        return max(nbytes / (BW * hw.elementwise_bw_eff), hw.elementwise_floor_s)

    # Prefill: one 128-token prompt, nothing cached.
    T = 128
    s = BatchShape.of([(0, T, True)])
    pairs = T * (T + 1) / 2
    expect = {
        "qkv_proj": gemm(T, (H + 2 * KV) * d, h),
        "attn_out_proj": gemm(T, h, H * d),
        "gate_up_proj": gemm(T, 2 * inter, h),
        "down_proj": gemm(T, h, inter),
        "prefill_attn": _roof(4 * pairs * d * H, P, hw.prefill_attn_eff(2 * pairs / T - 1),
                              b * (2 * T * H * d + 2 * T * KV * d), BW, hw.elementwise_bw_eff,
                              hw.prefill_attn_floor_s),
        "rmsnorm": 2 * ew(4 * T * h * b),
        "rope": ew(2 * T * (H + KV) * d * b),
        "kv_store": ew(2 * T * 2 * KV * d * b),
        "act": ew(3 * T * inter * b),
        "all_reduce": 0.0,
        "decode_attn": 0.0,
    }
    got = m.breakdown(s)
    for op, t in expect.items():
        assert got[op] / L == pytest.approx(t, rel=1e-12), op
    once = ew(2 * T * h * b) + ew(4 * T * h * b) + gemm(1, 128256, h)
    assert m.iteration_time(s) == pytest.approx(m.overhead_s + L * sum(expect.values()) + once, rel=1e-12)
    assert sum(got.values()) == pytest.approx(m.iteration_time(s), rel=1e-12)

    # Decode: 16 sequences with 1000 tokens of context each (999 cached + the new one).
    s = BatchShape.of([(999, 1, True)] * 16)
    ctx, n = 16 * 1000, 16
    kv_bytes = b * (ctx * 2 * KV * d + 2 * n * H * d)
    dattn = max(_roof(4 * ctx * H * d, P, hw.prefill_attn_eff(1000), kv_bytes, BW, hw.decode_attn_bw_eff(kv_bytes),
                      hw.decode_attn_floor_s), hw.decode_attn_cta_s * n * KV)
    got = m.breakdown(s)
    assert got["decode_attn"] / L == pytest.approx(dattn, rel=1e-12)
    assert got["qkv_proj"] / L == pytest.approx(gemm(n, (H + 2 * KV) * d, h), rel=1e-12)
    assert got["down_proj"] / L == pytest.approx(gemm(n, h, inter), rel=1e-12)
    assert got["lm_head"] == pytest.approx(gemm(n, 128256, h), rel=1e-12)
    assert got["prefill_attn"] == 0.0
    # Small-batch decode is bandwidth bound: the weights dominate, read once per step.
    assert m.memory_bound_time(s) > 0.8 * (m.iteration_time(s) - m.overhead_s)


@pytest.mark.parametrize("hw", ["a100-80g", "h100", "h200"])
@pytest.mark.parametrize("name,tp", [("llama3-8b", 1), ("llama3-8b", 2), ("llama3-70b", 4), ("tiny", 1)])
def test_more_tokens_never_faster(hw, name, tp):
    m = model(name, hw, tp)
    lens = sorted({int(1.13**i) for i in range(90)})  # 1 .. ~60K
    for pts in (
        [m.iteration_time(BatchShape.of([(0, n, True)])) for n in lens],  # longer prompts
        [m.iteration_time(BatchShape.of([(4096, n, True)])) for n in lens],  # longer chunks after a prefix
        [m.iteration_time(BatchShape.of([(500, 1, True)] * n)) for n in lens if n <= 4096],  # bigger decode batch
        [m.iteration_time(BatchShape.of([(c, 1, True)] * 32)) for c in lens],  # longer contexts
        [m.iteration_time(BatchShape.of([(0, 512, True)] + [(1000, 1, True)] * n)) for n in range(0, 300, 7)],
    ):
        assert all(b >= a for a, b in zip(pts, pts[1:])), pts


def test_tp2_halves_gemm_flops_and_adds_all_reduce():
    one, two = model(tp=1), model(tp=2)
    s = BatchShape.of([(0, 8192, True)])  # large m: every projection is compute bound
    b1, b2 = one.breakdown(s), two.breakdown(s)
    for op in ("qkv_proj", "attn_out_proj", "gate_up_proj", "down_proj"):
        assert b2[op] == pytest.approx(b1[op] / 2, rel=1e-9), op
    assert b1["all_reduce"] == 0.0
    hw = two.hw
    msg = 8192 * 4096 * 2
    fit = hw.allreduce_fit(2)
    per_call = fit.latency_s + 2 * (2 - 1) / 2 * msg / (hw.link_bw * fit.bw_eff(msg))
    assert b2["all_reduce"] == pytest.approx(32 * 2 * per_call, rel=1e-12)
    assert two.iteration_time(s) < one.iteration_time(s)


def test_kv_heads_replicate_past_their_count():
    m = model("llama3-8b", "h100", tp=16)  # 8 KV heads over 16 ranks: one (replicated) per rank
    assert m.kv_heads == 1 and m.heads == 2
    assert m.kv_bytes_per_token_per_gpu() == 2 * 32 * 1 * 128 * 2


def test_max_kv_tokens_by_hand():
    m = model("llama3-8b", "h100")
    weights = L3_8B.weight_bytes(2)
    assert m.weight_bytes_per_gpu() == weights == 2 * 8_030_261_248
    assert m.max_kv_tokens() == int((80 * GiB * 0.9 - weights - ACTIVATION_RESERVE_BYTES) // 131072)
    assert m.max_kv_tokens(0.5) < m.max_kv_tokens()
    four = model("llama3-70b", "h100", tp=4)
    assert four.kv_bytes_per_token_per_gpu() == 2 * 80 * 2 * 128 * 2


def test_bad_configs_name_their_key():
    with pytest.raises(ValueError, match=r"hardware\.name='b300'.*valid: \['a100-40g'"):
        Hardware.preset("b300")
    with pytest.raises(ValueError, match=r"model\.name='gpt-5'"):
        ModelShape.preset("gpt-5")
    with pytest.raises(ValueError, match=r"model\.tensor_parallel_size=3 does not divide llama3-8b's num_heads"):
        model(tp=3)
    with pytest.raises(ValueError, match=r"model\.tensor_parallel_size=8 does not divide qwen2\.5-7b's num_heads"):
        model("qwen2.5-7b", "h100", tp=8)
    with pytest.raises(ValueError, match=r"model\.tensor_parallel_size=0"):
        model(tp=0)
    with pytest.raises(ValueError, match=r"llama3-70b does not fit on hardware\.name=a100-40g at "
                                         r"model\.tensor_parallel_size=1"):
        model("llama3-70b", "a100-40g", tp=1)
    with pytest.raises(ValueError, match=r"hardware\.name=a100-80g"):
        model("llama3-70b", "a100-80g", tp=1)
    assert model("llama3-70b", "a100-80g", tp=2).max_kv_tokens() > 4096


@pytest.mark.parametrize("hw", hardware_names())
@pytest.mark.parametrize("name,tp", [("llama3-8b", 1), ("llama3-70b", 8), ("llama-100m", 1), ("qwen2.5-7b", 4)])
def test_decode_times_equal_the_iteration_loop_bit_for_bit(hw, name, tp):
    m = model(name, hw, tp)
    for batch, ctx, steps in ((1, 7, 300), (37, 37 * 900, 200), (256, 256 * 3000, 50), (200, 200 * 3, 40)):
        loop = [m.iteration_time(BatchShape(decode_seqs=batch, decode_ctx_tokens=ctx + batch * i, sampled=batch))
                for i in range(steps)]
        assert m.decode_times(batch, ctx, steps) == loop
        assert BaseCostModel.decode_times(m, batch, ctx, steps) == loop
        mem = [m.memory_bound_time(BatchShape(decode_seqs=batch, decode_ctx_tokens=ctx + batch * i, sampled=batch))
               for i in range(steps)]
        assert m.decode_times_memory_bound(batch, ctx, steps) == (loop, mem)
    assert m.decode_times(4, 100, 0) == []


def test_cost_model_protocol_and_empty_batch():
    m = model()
    assert isinstance(m, CostModel) and m.name == "roofline"
    assert m.iteration_time(BatchShape()) == 0.0 and m.breakdown(BatchShape()) == {}
    assert model(overhead_s=0.0).iteration_time(BatchShape.of([(10, 1, True)])) < m.iteration_time(
        BatchShape.of([(10, 1, True)]))


def test_h800_borrows_h100_efficiencies_with_its_own_link():
    h100, h800 = Hardware.preset("h100"), Hardware.preset("h800")
    assert h800.calibrated_on == h100.calibrated_on == "h100_sxm"
    assert h800.gemm_compute_eff == h100.gemm_compute_eff and h800.link_bw == 200e9 < h100.link_bw
    s = BatchShape.of([(0, 4096, True)])
    assert model("llama3-70b", "h800", 4).breakdown(s)["all_reduce"] > model("llama3-70b", "h100", 4).breakdown(
        s)["all_reduce"]
