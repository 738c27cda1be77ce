"""Roofline cost model of a Llama-family forward pass on a GPU, calibrated on measured kernel latencies.

Each operator costs max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth, kernel floor), where
"achievable" is the spec peak times an efficiency measured for that operator family (calibration/gpu.json),
so one set of formulas covers prefill, decode and mixed batches at any TP degree. What the kernel tables
cannot show (CPU scheduling, sampling, Python) is one fixed per-iteration overhead.
"""

from __future__ import annotations

from semipd_engine.sim.batch import BaseCostModel, BatchShape
from semipd_engine.sim.hardware import GiB, Hardware
from semipd_engine.sim.shapes import ModelShape

# Per-step CPU work a CUDA-graphed engine does not hide behind the GPU (scheduling, input preparation,
# sampling, output processing). Not in the kernel tables; an assumption of the order vLLM-class engines show
# at small batch. Override per run.
DEFAULT_OVERHEAD_S = 1.0e-3
# Activation and workspace memory kept out of the KV pool. vLLM measures it in a profiling run; this is an
# assumption of that order (the gate/up output of an 8K-token batch of an 8B model alone is ~0.5 GiB).
ACTIVATION_RESERVE_BYTES = 1 * GiB
# A replica must hold the KV of at least one long prompt, or no realistic trace can run on it.
MIN_KV_TOKENS = 4096


class Ops:
    """Operator timings on one GPU: the primitives the model composes, reused by the calibration report."""

    def __init__(self, hw: Hardware, dtype_bytes: int = 2):
        self.hw, self.b = hw, dtype_bytes

    def _roof(self, flops: float, ceff: float, nbytes: float, beff: float, floor: float) -> tuple[float, bool]:
        tc = flops / (self.hw.peak_flops * ceff)
        tm = nbytes / (self.hw.mem_bw * beff)
        t = max(tc, tm, floor)
        return t, tm >= tc and tm >= floor

    def gemm(self, m: int, n: int, k: int) -> tuple[float, bool]:
        """(seconds, memory-bound?) of an (m x k) @ (k x n) GEMM."""
        if m <= 0:
            return 0.0, False
        hw = self.hw
        nbytes = (m * k + k * n + m * n) * self.b
        return self._roof(2.0 * m * n * k, hw.gemm_compute_eff(m), nbytes, hw.gemm_bw_eff(nbytes), hw.gemm_floor_s)

    def prefill_attn(self, seqs: int, tokens: int, pairs: float, kv_tokens: int, heads: int, kv_heads: int,
                     head_dim: int) -> tuple[float, bool]:
        """Causal attention of ``tokens`` new queries over ``pairs`` query-key pairs (FlashAttention varlen).

        A chunk after a cached prefix is never cheaper than a decode step reading the same KV, or turning a
        one-token decode into a two-token chunk would make an iteration faster. (Fresh prompts keep their own,
        measured, floor.)
        """
        if tokens <= 0:
            return 0.0, False
        hw = self.hw
        flops = 4.0 * pairs * head_dim * heads  # QK^T and PV, 2 FLOPs per multiply-add each
        nbytes = (2 * tokens * heads + 2 * kv_tokens * kv_heads) * head_dim * self.b  # Q in, O out, K and V in
        # The equivalent fresh-prompt length: what the efficiency was measured against (keys per query).
        x = 2.0 * pairs / tokens - 1.0
        own = self._roof(flops, hw.prefill_attn_eff(max(x, 1.0)), nbytes, hw.elementwise_bw_eff,
                         hw.prefill_attn_floor_s)
        if kv_tokens > tokens:
            return max(own, self.kv_read(max(seqs, 1), kv_tokens, heads, kv_heads, head_dim))
        return own

    def kv_read(self, seqs: int, ctx_tokens: int, heads: int, kv_heads: int, head_dim: int) -> tuple[float, bool]:
        """One query per sequence over its whole context, at the decode kernel's measured efficiency."""
        hw = self.hw
        flops = 4.0 * ctx_tokens * heads * head_dim
        nbytes = (ctx_tokens * 2 * kv_heads + 2 * seqs * heads) * head_dim * self.b
        return self._roof(flops, hw.prefill_attn_eff(max(ctx_tokens / seqs, 1.0)), nbytes,
                          hw.decode_attn_bw_eff(nbytes), hw.decode_attn_floor_s)

    def decode_attn(self, seqs: int, ctx_tokens: int, heads: int, kv_heads: int, head_dim: int
                    ) -> tuple[float, bool]:
        """A decode step reads every KV token once; many short contexts are bound by thread blocks instead."""
        if seqs <= 0:
            return 0.0, False
        t, mem = self.kv_read(seqs, ctx_tokens, heads, kv_heads, head_dim)
        blocks = self.hw.decode_attn_cta_s * seqs * kv_heads
        return (blocks, False) if blocks > t else (t, mem)

    def decode_attn_steps(self, seqs: int, ctx_tokens: int, steps: int, heads: int, kv_heads: int, head_dim: int
                          ) -> list[tuple[float, bool]]:
        """`decode_attn` of `steps` decode iterations whose summed context grows by `seqs` each step, to the bit
        (the same expressions, the curves walked once: a fast-forward prices ~10^6 steps a run)."""
        if seqs <= 0:
            return [(0.0, False)] * max(steps, 0)
        hw, b = self.hw, self.b
        ctxs = range(ctx_tokens, ctx_tokens + seqs * steps, seqs)
        nbytes = [(c * 2 * kv_heads + 2 * seqs * heads) * head_dim * b for c in ctxs]
        ceffs = hw.prefill_attn_eff.many([max(c / seqs, 1.0) for c in ctxs])
        beffs = hw.decode_attn_bw_eff.many(nbytes)
        peak, bw, floor = hw.peak_flops, hw.mem_bw, hw.decode_attn_floor_s
        blocks = hw.decode_attn_cta_s * seqs * kv_heads
        out = []
        for c, nb, ceff, beff in zip(ctxs, nbytes, ceffs, beffs):
            tc = 4.0 * c * heads * head_dim / (peak * ceff)  # _roof's, as kv_read calls it
            tm = nb / (bw * beff)
            t = max(tc, tm, floor)
            out.append((blocks, False) if blocks > t else (t, tm >= tc and tm >= floor))
        return out

    def elementwise(self, nbytes: float) -> tuple[float, bool]:
        if nbytes <= 0:
            return 0.0, False
        tm = nbytes / (self.hw.mem_bw * self.hw.elementwise_bw_eff)
        return (tm, True) if tm >= self.hw.elementwise_floor_s else (self.hw.elementwise_floor_s, False)

    def allreduce(self, nbytes: float, tp: int) -> float:
        """Ring all-reduce: each rank sends and receives 2(tp-1)/tp of the message over NVLink."""
        if tp <= 1 or nbytes <= 0:
            return 0.0
        wire = 2.0 * (tp - 1) / tp * nbytes
        fit = self.hw.allreduce_fit(tp)
        if fit is None:
            return self.hw.link_latency_s + wire / self.hw.link_bw
        return fit.latency_s + wire / (self.hw.link_bw * fit.bw_eff(nbytes))

    def allgather(self, nbytes: float, tp: int) -> float:
        """Gather of a message split ``tp`` ways: (tp-1)/tp of it crosses the link, half a ring all-reduce."""
        if tp <= 1 or nbytes <= 0:
            return 0.0
        fit = self.hw.allreduce_fit(tp)
        lat, eff = (fit.latency_s, fit.bw_eff(nbytes)) if fit else (self.hw.link_latency_s, 1.0)
        return lat + (tp - 1) / tp * nbytes / (self.hw.link_bw * eff)


class RooflineCostModel(BaseCostModel):
    """Iteration time of one model replica (``tp`` GPUs) from per-operator rooflines.

    ``dtype_bytes`` sizes weights, activations and KV; the compute peak stays the bf16 one, which is what the
    efficiencies were measured against.
    """

    name = "roofline"

    def __init__(self, model: ModelShape, hw: Hardware, tp: int = 1, dtype_bytes: int = 2,
                 overhead_s: float = DEFAULT_OVERHEAD_S):
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"model.tensor_parallel_size={tp!r} must be a positive integer")
        if dtype_bytes not in (1, 2, 4):
            raise ValueError(f"model.dtype: dtype_bytes must be 1, 2 or 4, got {dtype_bytes}")
        if overhead_s < 0:
            raise ValueError(f"overhead_s must be >= 0, got {overhead_s}")
        m = model
        for what, n in (("num_heads", m.num_heads), ("intermediate_size", m.intermediate_size),
                        ("vocab_size", m.vocab_size)):
            if n % tp:
                raise ValueError(f"model.tensor_parallel_size={tp} does not divide {m.name}'s {what}={n}")
        # KV heads split across ranks while there are enough; past that each rank keeps a replica of one
        # (vLLM's rule), which needs tp to be a multiple of them.
        if (tp <= m.num_kv_heads and m.num_kv_heads % tp) or (tp > m.num_kv_heads and tp % m.num_kv_heads):
            raise ValueError(f"model.tensor_parallel_size={tp} neither divides nor is a multiple of "
                             f"{m.name}'s num_kv_heads={m.num_kv_heads}")
        self.model, self.hw, self.tp, self.b, self.overhead_s = model, hw, tp, dtype_bytes, overhead_s
        self.heads = m.num_heads // tp
        self.kv_heads = max(m.num_kv_heads // tp, 1)
        self.inter = m.intermediate_size // tp
        self.vocab = m.vocab_size // tp
        # _sums by shape (decode context aside): a simulation prices tens of thousands of iterations whose
        # shapes repeat (decode batches of the same size), each over ~15 operators.
        self._memo: dict[tuple, tuple[float, float, float, float]] = {}
        # The operators that depend on the token count alone, by it: a prefill's shape rarely repeats, its
        # token count does. And decode attention's last (sequences, context): priced twice per iteration where
        # the HBM-bound part is wanted too.
        self._by_tokens: dict[int, tuple[list, list]] = {}
        self._last_attn: tuple[int, int, tuple[float, bool]] = (-1, -1, (0.0, False))
        self.ops = Ops(hw, dtype_bytes)
        kv = self.max_kv_tokens()
        if kv < MIN_KV_TOKENS:
            raise ValueError(
                f"model.name={m.name} does not fit on hardware.name={hw.name} at model.tensor_parallel_size={tp}: "
                f"{self.weight_bytes_per_gpu() / GiB:.1f} GiB of weights per GPU of {hw.mem_bytes / GiB:.0f} GiB "
                f"leaves KV room for {kv} tokens (< {MIN_KV_TOKENS}); raise the TP degree or pick a larger GPU")

    # -- memory ---------------------------------------------------------------------------------------------
    def weight_bytes_per_gpu(self) -> int:
        m, h, d = self.model, self.model.hidden_size, self.model.head_dim
        layer = h * (self.heads + 2 * self.kv_heads) * d + self.heads * d * h + 3 * h * self.inter + 2 * h
        emb = self.vocab * h * (1 if m.tie_word_embeddings else 2)
        return (m.num_layers * layer + emb + h) * self.b

    def kv_bytes_per_token_per_gpu(self) -> int:
        return 2 * self.model.num_layers * self.kv_heads * self.model.head_dim * self.b

    def max_kv_tokens(self, mem_fraction: float = 0.9) -> int:
        """KV tokens one replica holds after weights and activations, with ``mem_fraction`` of HBM in use."""
        free = self.hw.mem_bytes * mem_fraction - self.weight_bytes_per_gpu() - ACTIVATION_RESERVE_BYTES
        return max(int(free // self.kv_bytes_per_token_per_gpu()), 0)

    # -- time -----------------------------------------------------------------------------------------------
    def _layer_ops(self, s: BatchShape) -> list[tuple[str, float, bool]]:
        """Per-layer operators except decode attention (the only one that depends on context length)."""
        m, ops = self.model, self.ops
        hq, hkv, d = self.heads, self.kv_heads, m.head_dim
        before, after = self._token_ops(s.num_tokens)
        return [*before, ("prefill_attn", *ops.prefill_attn(s.prefill_seqs, s.prefill_tokens, s.prefill_attn_pairs,
                                                            s.prefill_kv_tokens, hq, hkv, d)), *after]

    def _token_ops(self, t: int) -> tuple[list, list]:
        """The per-layer operators before and after prefill attention, which depend on the token count alone."""
        hit = self._by_tokens.get(t)
        if hit is None:
            m, ops, b = self.model, self.ops, self.b
            h, d, hq, hkv = m.hidden_size, m.head_dim, self.heads, self.kv_heads
            norm = ops.elementwise(4 * t * h * b)  # fused residual add + RMSNorm: x and residual in, both out
            hit = ([("qkv_proj", *ops.gemm(t, (hq + 2 * hkv) * d, h)),
                    ("attn_out_proj", *ops.gemm(t, h, hq * d)),
                    ("gate_up_proj", *ops.gemm(t, 2 * self.inter, h)),
                    ("down_proj", *ops.gemm(t, h, self.inter))],
                   [("rmsnorm", 2 * norm[0], norm[1]),
                    ("rope", *ops.elementwise(2 * t * (hq + hkv) * d * b)),
                    ("kv_store", *ops.elementwise(2 * t * 2 * hkv * d * b)),
                    ("act", *ops.elementwise(3 * t * self.inter * b)),
                    ("all_reduce", 2 * ops.allreduce(t * h * b, self.tp), False)])
            if len(self._by_tokens) >= 1 << 16:
                self._by_tokens.clear()
            self._by_tokens[t] = hit
        return hit

    def _once_ops(self, s: BatchShape) -> list[tuple[str, float, bool]]:
        m, ops, b, t = self.model, self.ops, self.b, s.num_tokens
        return [
            ("embedding", *ops.elementwise(2 * t * m.hidden_size * b)),
            ("final_norm", *ops.elementwise(4 * t * m.hidden_size * b)),
            ("lm_head", *ops.gemm(s.sampled, self.vocab, m.hidden_size)),
            ("logits_gather", ops.allgather(s.sampled * m.vocab_size * b, self.tp), False),
        ]

    def _decode_attn(self, seqs: int, ctx_tokens: int) -> tuple[float, bool]:
        last = self._last_attn
        if last[0] == seqs and last[1] == ctx_tokens:
            return last[2]
        out = self.ops.decode_attn(seqs, ctx_tokens, self.heads, self.kv_heads, self.model.head_dim)
        self._last_attn = (seqs, ctx_tokens, out)
        return out

    def _decode_attn_steps(self, seqs: int, ctx_tokens: int, steps: int) -> list[tuple[float, bool]]:
        if steps <= 2:  # a saturated engine's stretches: the last shape priced is often this one (`_decode_attn`)
            return [self._decode_attn(seqs, ctx_tokens + seqs * i) for i in range(steps)]
        return self.ops.decode_attn_steps(seqs, ctx_tokens, steps, self.heads, self.kv_heads, self.model.head_dim)

    def _sums(self, s: BatchShape) -> tuple[float, float, float, float]:
        """(per layer, once) seconds of the operators but decode attention, then their HBM-bound part."""
        key = (s.prefill_seqs, s.prefill_tokens, s.prefill_attn_pairs, s.prefill_kv_tokens, s.decode_seqs,
               s.sampled)
        hit = self._memo.get(key)
        if hit is None:
            layer_ops, once_ops = self._layer_ops(s), self._once_ops(s)
            layer = 0.0
            for _, t, _ in layer_ops:
                layer += t
            once = 0.0
            for _, t, _ in once_ops:
                once += t
            hit = (layer, once, sum(t for _, t, mem in layer_ops if mem), sum(t for _, t, mem in once_ops if mem))
            if len(self._memo) >= 1 << 16:
                self._memo.clear()
            self._memo[key] = hit
        return hit

    def _fixed(self, s: BatchShape) -> tuple[float, float]:
        return self._sums(s)[:2]

    def _combine(self, layer_fixed: float, decode_attn: float, once: float) -> float:
        return self.overhead_s + self.model.num_layers * (layer_fixed + decode_attn) + once

    def iteration_time(self, shape: BatchShape) -> float:
        if shape.num_tokens == 0:
            return 0.0
        layer, once = self._fixed(shape)
        return self._combine(layer, self._decode_attn(shape.decode_seqs, shape.decode_ctx_tokens)[0], once)

    def decode_times(self, batch: int, ctx_tokens: int, steps: int) -> list[float]:
        # Same arithmetic as iteration_time, with the context-independent part computed once.
        if batch <= 0:
            return [0.0] * max(steps, 0)
        layer, once = self._fixed(BatchShape(decode_seqs=batch, decode_ctx_tokens=ctx_tokens, sampled=batch))
        over, n = self.overhead_s, self.model.num_layers  # _combine's expression, inlined
        return [over + n * (layer + dt) + once for dt, _ in self._decode_attn_steps(batch, ctx_tokens, steps)]

    def decode_times_memory_bound(self, batch: int, ctx_tokens: int, steps: int
                                  ) -> tuple[list[float], list[float]]:
        if batch <= 0:
            return [0.0] * max(steps, 0), [0.0] * max(steps, 0)
        s = BatchShape(decode_seqs=batch, decode_ctx_tokens=ctx_tokens, sampled=batch)
        layer, once = self._fixed(s)
        layer_mem, once_mem = self._fixed_memory_bound(s)
        over, n = self.overhead_s, self.model.num_layers  # _combine's and _combine_memory_bound's, inlined
        times, mems = [], []
        for dt, dmem in self._decode_attn_steps(batch, ctx_tokens, steps):
            times.append(over + n * (layer + dt) + once)
            mems.append(n * (layer_mem + (dt if dmem else 0.0)) + once_mem)
        return times, mems

    def breakdown(self, shape: BatchShape) -> dict[str, float]:
        """Seconds per operator for the whole iteration (all layers), plus the fixed overhead."""
        if shape.num_tokens == 0:
            return {}
        n = self.model.num_layers
        out = {name: n * t for name, t, _ in self._layer_ops(shape)}
        out["decode_attn"] = n * self._decode_attn(shape.decode_seqs, shape.decode_ctx_tokens)[0]
        out.update({name: t for name, t, _ in self._once_ops(shape)})
        out["overhead"] = self.overhead_s
        return out

    def _fixed_memory_bound(self, s: BatchShape) -> tuple[float, float]:
        """The HBM-bound seconds of `_fixed`'s operators: (per layer, once)."""
        return self._sums(s)[2:]

    def _combine_memory_bound(self, layer_mem: float, decode_attn_mem: float, once_mem: float) -> float:
        # One formula for a single iteration and the fast-forward: their times agree to the bit.
        return self.model.num_layers * (layer_mem + decode_attn_mem) + once_mem

    def memory_bound_time(self, shape: BatchShape) -> float:
        """Seconds of operators bound by HBM bandwidth: what a concurrent phase's traffic slows down."""
        if shape.num_tokens == 0:
            return 0.0
        dt, dmem = self._decode_attn(shape.decode_seqs, shape.decode_ctx_tokens)
        layer_mem, once_mem = self._fixed_memory_bound(shape)
        return self._combine_memory_bound(layer_mem, dt if dmem else 0.0, once_mem)

    def describe(self) -> str:
        return (f"{self.name}: {self.model.name} on {self.tp} x {self.hw.name} (efficiencies of "
                f"{self.hw.calibrated_on}), {self.max_kv_tokens()} KV tokens")
