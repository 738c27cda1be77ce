"""Derive the serving-stack presets (host cost per request and per iteration) from public material, and report.

The roofline (derive.py, gpu.json) prices the GPU's kernels; the programs the semi-PD paper compared also spend
CPU time around them: an HTTP server and tokeniser before a request reaches the engine, and a Python scheduler,
input preparation, sampling and output processing on every iteration, which stall the GPU unless the stack
overlaps them with the previous step. semipd_engine/sim/stack.py charges that cost; this script derives its
presets' numbers (all in seconds) and writes them, each with its sources, its rule and the fields that are
assumptions rather than measurements:

    python -m semipd_engine.sim.calibration.stacks --out semipd_engine/sim/calibration/stacks.json --report

It needs no network and no third-party package: the few public numbers it uses are transcribed below as
constants, each with its repository, commit and path (or URL). To re-read a removed file, clone the repository
and use git, e.g. ``git -C vidur show 6d98aa8:data/profiling/a100/cpu_overheads.csv``.

Rules (the report prints each source's residuals and the cross-checks):

- ``vllm-0.2``: least squares of per-iteration CPU time = a + b * batch on Vidur's measured rows (Llama-2-7B,
  A100, the vLLM-0.2-era engine its profiler drove), summed the way Vidur's simulator sums them (medians of
  schedule, sampler, prepare-inputs and process-outputs plus the mean Ray hop). The per-token part is the
  prefill's extra input-preparation time, read off the gap between the mean and the median of prepare-inputs
  (the one prefill iteration of 256 tokens per sequence among about 3 * batch decode iterations).
- ``vllm-0.6`` (v0.6.0, single step, async output processing on): the engine's host time per decode step at
  light load in v0.5.3 is 29% of 13 ms (the v0.6.0 post: scheduling and input preparation 29%, one token every
  13 ms under light load; vLLM RFC #6854 measured ~4 ms of GPU idle per decode step, which agrees); async output
  processing (PR #7049) takes the output processing off the critical path, whose size per batch is RFC #6913's
  0.2 ms at batch 1 and 3.4 ms at batch 32; the remaining per-sequence slope is Vidur's for the synchronous
  parts (schedule, sampler, prepare-inputs). The API server left the engine's process in v0.6.0 (PR #6883).
  v0.6.0's other CPU savings (object cache, fast sampling path) have no per-step figure and are not subtracted,
  so this is an upper estimate.
- ``vllm-0.6-multistep``: the same, paid once per 10 decode steps (``--num-scheduler-steps 10``, the post's
  setting; multi-step runs decode-only iterations, a prefill iteration still pays every time).
- ``vllm-v1``: BLIS's trained-physics coefficients for vLLM 0.15.1 on H100 (the set inference-sim ships):
  request = alpha0, step = beta7 + alpha2, per sequence = beta6. BLIS's step model is additive, so these are the
  host terms left exposed and the preset does not overlap.
- ``sglang-0.4``: the overlap scheduler's hidden host cost from two public measurements, a line through them:
  16 running decodes at 3053.86 -> 3458.31 token/s when the decode overlap loop was switched on (sglang PR
  #5608), and the 10% throughput the overlap scheduler adds at saturation (sglang PR #1738, the v0.4 post's
  1.1x), where Little's law on the PR's own means gives the running batch.
- ``distserve`` and ``semipd``: what their code shows (the loop structure, so ``overlap`` and ``multistep``)
  is known; the cost terms are carried over from the stack of the same design and marked as assumed.
- ``request_s`` is measured only for vLLM V1 (BLIS alpha0); the other stacks borrow it (assumed).
- ``ideal`` charges nothing; ``generic`` is the 1 ms per iteration the simulator charged every engine before
  these presets (kept to reproduce older numbers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import statistics
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "stacks.json"
COMMAND = "python -m semipd_engine.sim.calibration.stacks --out semipd_engine/sim/calibration/stacks.json --report"
FIELDS = ("request_s", "step_s", "per_seq_s", "per_token_s", "overlap", "multistep")
MS, US = 1e-3, 1e-6
# The vllm-0.2 line must reproduce every Vidur row within this relative error (the test checks it).
VIDUR_TOLERANCE = 0.05

# -- sources --------------------------------------------------------------------------------------------------
SOURCES = {
    "vidur-cpu-overheads": {
        "repository": "microsoft/vidur", "commit": "6d98aa8f71696520acc603d87439e77cc78160a7",
        "path": "data/profiling/a100/cpu_overheads.csv",
        "what": "per-iteration CPU times (ms) of the vLLM-0.2-era engine against batch size, A100; the "
                "meta-llama/Llama-2-7b-hf TP1 rows (the file was removed in commit bee57da)",
    },
    "vidur-code": {
        "repository": "microsoft/vidur", "commit": "6d98aa8f71696520acc603d87439e77cc78160a7",
        "path": "simulator/entities/execution_time.py; "
                "simulator/execution_time_predictor/sklearn_execution_time_predictor.py; "
                "simulator/profiling/cpu_overhead/cpu_overhead_benchmark_runner.py",
        "what": "how Vidur sums the rows (schedule + sampler_e2e + prepare_inputs_e2e + process_model_outputs "
                "medians + ray_comm_time mean) and how they were measured (sarathi LLMEngine with "
                "scheduler_type vllm, batch_size requests of 256 prompt tokens and 3 * batch_size output tokens)",
    },
    "vllm-v060-post": {
        "repository": "vllm-project/vllm-project.github.io", "commit": "c3a01c4a5807c8d900ae468897e45263373e534e",
        "path": "_posts/2024-09-05-perf-update.md", "url": "https://blog.vllm.ai/2024/09/05/perf-update.html",
        "what": "v0.5.3, Llama 3 8B, 1xH100: API server 33%, scheduling and input preparation 29%, GPU 38%; "
                "1 token every 13 ms under light load; API server moved to its own process (PR #6883); "
                "multi-step +28% throughput and async output processing -8.7% TPOT (70B, 4xH100); "
                "benchmarks ran --num-scheduler-steps 10",
    },
    "vllm-rfc-6854": {
        "repository": "vllm-project/vllm", "url": "https://github.com/vllm-project/vllm/issues/6854",
        "what": "multi-step scheduling RFC: about 4 ms of GPU bubble on every decode step (5-13 ms quoted), "
                "from sampled-token transfer, pythonisation, output processing, input preparation, scheduler",
    },
    "vllm-rfc-6913": {
        "repository": "vllm-project/vllm", "url": "https://github.com/vllm-project/vllm/issues/6913",
        "what": "async output processor RFC: _process_model_outputs takes 0.2 ms at batch 1 and 3.4 ms at "
                "batch 32 (Llama3-70B FP8, 4xH100, 128 input tokens)",
    },
    "vllm-pr-7049": {
        "repository": "vllm-project/vllm", "url": "https://github.com/vllm-project/vllm/pull/7049",
        "what": "async output processor: process_model_outputs overlapped with the forward pass; +11% "
                "throughput for Llama3.1-8B FP8 on 1xH100",
    },
    "vllm-pr-7743": {
        "repository": "vllm-project/vllm", "url": "https://github.com/vllm-project/vllm/pull/7743",
        "what": "async output processing combined with 8-step multi-step (merged as PR #7921): TPOT 27.71 -> "
                "21.05 ms, Llama3.1-8B, H100, 10 RPS, 1024 in / 512 out, 200 requests, 30.65 s; a cross-check",
    },
    "blis-defaults": {
        "repository": "inference-sim/inference-sim", "commit": "f90a1e3a6787da17c2cd463dab6fb2660b1b1760",
        "path": "defaults.yaml (trained_physics_coefficients); sim/latency/trained_physics_model.go; "
                "sim/event.go; sim/simulator.go",
        "what": "BLIS iter29 fit for vLLM 0.15.1 (V1) on H100 (loss 34.57%): alpha0 15563.2 us per request "
                "(arrival -> queued), alpha1 777.3 us post-decode, alpha2 45.9 us per output token (added to "
                "each ITL), beta5 32.1 us per layer, beta6 4.42 us per request in the batch, beta7 126.0 us "
                "per step; the step model is additive",
    },
    "blis-registry": {
        "repository": "inference-sim/blis-registry", "commit": "103e5deb3f558c0ef7c8877473b6b7975045df30",
        "path": "coefficients/trained-physics.yaml",
        "what": "the same iter29 coefficients with their meaning (beta5 kernel launch / CUDA graph / norms per "
                "layer; beta6 queue management, attention mask, token lookup; beta7 sync, sampler, logging)",
    },
    "blis-training-fit": {
        "repository": "inference-sim/training", "commit": "ed5c1d26900e6909758d5e1641a18edaf56a1caf",
        "path": "output/fit/coefficients.json",
        "what": "an earlier, simpler BLIS fit on the same runs (alpha0 9315 us, beta5 43.5 us per layer, "
                "beta6 48.8 us per request, beta7 0): reported as the spread, not used",
    },
    "sglang-pr-5608": {
        "repository": "sgl-project/sglang", "url": "https://github.com/sgl-project/sglang/pull/5608",
        "what": "decode overlap schedule for the PD decode server: 16 running requests, gen throughput "
                "3053.86 -> 3458.31 token/s (Llama-3.1-8B, TP4)",
    },
    "sglang-pr-1738": {
        "repository": "sgl-project/sglang", "url": "https://github.com/sgl-project/sglang/pull/1738",
        "what": "overlap scheduler: 10% more throughput with radix cache off; overlap run of 3000 ShareGPT "
                "prompts at rate inf, Llama-3.1-8B: 51.03 req/s, 9893.56 output token/s, mean E2E 28986.97 ms, "
                "mean TTFT 14495.13 ms",
    },
    "sglang-v04-post": {
        "url": "https://lmsys.org/blog/2024-12-04-sglang-v0-4/",
        "what": "SGLang v0.4: zero-overhead batch scheduler (CPU scheduling of the next batch overlapped with the "
                "GPU), 1.1x throughput",
    },
    "distserve-code": {
        "repository": "LLMServe/DistServe", "commit": "82831f1604cc6b10bebd360f6c437a07790dde9f",
        "path": "distserve/single_stage_engine.py; distserve/worker.py",
        "what": "asyncio engine per stage: Python scheduler and block manager, one Ray actor call per step to "
                "the C++ (SwiftTransformer) workers, awaited before the next step (pp = 1), tokenizer.decode "
                "per generated token; sleeps 3 ms when a stage has no request",
    },
    "distserve-profiles": {
        "repository": "LLMServe/DistServe", "commit": "82831f1604cc6b10bebd360f6c437a07790dde9f",
        "path": "simdistserve/estimators/profile_data/profiler-a100-80g.distserve.json; "
                "simdistserve/estimators/profile_data/profiler-a100-80g.vllm.json",
        "what": "fitted iteration times (ms) of DistServe and of the vLLM it compared against, same A100-80GB "
                "and OPT models; host time is folded into the fits, so they cannot separate it (a cross-check)",
    },
    "semipd-code": {
        "repository": "infinigence/Semi-PD", "commit": "2565f9f5503607fe20b542b1bd47a81e0bec3e3d",
        "path": "python/sglang/srt/managers/semi_pd_scheduler.py; python/sglang/version.py",
        "what": "SGLang 0.4.4.post1 fork: a prefill and a decode scheduler process; the decode one runs "
                "event_loop_overlap (when overlap is enabled, the default), the prefill one event_loop_normal",
    },
}

# -- transcribed tables ---------------------------------------------------------------------------------------
# vidur-cpu-overheads, meta-llama/Llama-2-7b-hf, TP1, ms: (batch, schedule_median, sampler_e2e_median,
# prepare_inputs_e2e_median, process_model_outputs_median, ray_comm_time_mean, prepare_inputs_e2e_mean).
VIDUR_LLAMA2_7B_A100 = (
    (8, 0.1555, 0.5092, 0.3366, 0.1719, 0.2204, 0.3746),
    (16, 0.2839, 0.5472, 0.3779, 0.3189, 0.2680, 0.4127),
    (24, 0.3973, 0.5729, 0.4119, 0.4391, 0.3107, 0.4404),
    (32, 0.5112, 0.6084, 0.4339, 0.5428, 0.3358, 0.4543),
    (40, 0.6383, 0.6512, 0.4843, 0.6750, 0.4258, 0.5162),
    (48, 0.7687, 0.6683, 0.5268, 0.8445, 0.4633, 0.5588),
    (56, 0.8949, 0.7082, 0.5752, 0.9812, 0.5182, 0.6048),
    (64, 1.0212, 0.8245, 0.6059, 1.0608, 0.5712, 0.6328),
    (64, 1.0131, 0.8163, 0.6071, 1.0419, 0.5819, 0.6325),
    (80, 1.2649, 0.9408, 0.6845, 1.2982, 0.6792, 0.7058),
    (96, 1.5512, 0.9579, 0.8445, 1.5605, 0.7948, 0.8684),
    (112, 1.7986, 1.0544, 0.9427, 1.8022, 0.8941, 1.2523),
    (128, 2.0483, 1.0997, 1.0253, 2.0483, 1.0049, 1.2746),
)
VIDUR_PROMPT_TOKENS = 256  # vidur-code: NUM_PREFILL_TOKEN
VIDUR_DECODE_FACTOR = 3  # vidur-code: max_tokens = 3 * batch_size, so about 3 * batch iterations per run

# vllm-v060-post (v0.5.3, Llama 3 8B, 1xH100).
V053_SCHED_SHARE = 0.29  # scheduling, including gathering the last step's results, and input preparation
V053_API_SHARE = 0.33
V053_GPU_SHARE = 0.38
V053_LIGHT_TOKEN_MS = 13.0  # "1 token every 13 ms under light load"
V060_MULTISTEP = 10  # --num-scheduler-steps 10
RFC6854_BUBBLE_MS = 4.0  # vllm-rfc-6854
RFC6913_OUTPUT_MS = ((1, 0.2), (32, 3.4))  # vllm-rfc-6913: (batch, _process_model_outputs ms)
PR7743 = {"tpot_sync_ms": 27.71, "tpot_async_ms": 21.05, "requests": 200, "output_len": 512, "duration_s": 30.65}

# blis-defaults / blis-registry, us.
BLIS = {"alpha0": 15563.199579, "alpha1": 777.3455, "alpha2": 45.907545,
        "beta5": 32.09546717, "beta6": 4.41684444, "beta7": 126.024825}
BLIS_TRAINING = {"alpha0": 9315.338771116985, "beta5": 43.500541908701074, "beta6": 48.80613214319187, "beta7": 0.0}

# sglang-pr-5608 and sglang-pr-1738.
SGL_DECODE = {"running": 16, "tok_s_normal": 3053.86, "tok_s_overlap": 3458.31}
SGL_SATURATED = {"gain": 0.10, "req_s": 51.03, "out_tok_s": 9893.56, "e2e_ms": 28986.97, "ttft_ms": 14495.13}

# distserve-profiles: OPT-13B, TP1, decoding_smallbs [a ms, b ms per context token, c ms per request].
DISTSERVE_OPT13B_TP1 = {"distserve": (19.934702624895458, 0.0006269356524350583, 0.03850697740828398),
                        "vllm": (23.475041008414784, 0.000592934466077393, 0.060726861260369455)}
DISTSERVE_IDLE_SLEEP_S = 0.003  # distserve-code: SLEEP_WHEN_CONTEXT_NO_REQUEST / SLEEP_WHEN_DECODING_NO_REQUEST


# -- helpers --------------------------------------------------------------------------------------------------
def sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def ols(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope of ys against xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def vidur_total_ms(row) -> float:
    """Vidur's per-iteration CPU overhead: the sum its simulator charges (vidur-code)."""
    _, sched, sampler, prep, outputs, ray, _ = row
    return sched + sampler + prep + outputs + ray


def vidur_sync_ms(row) -> float:
    """The parts that still block the GPU once output processing is asynchronous and there is no Ray hop."""
    _, sched, sampler, prep, _, _, _ = row
    return sched + sampler + prep


# -- derivations ----------------------------------------------------------------------------------------------
def fit_vidur() -> dict:
    batch = [float(r[0]) for r in VIDUR_LLAMA2_7B_A100]
    total = [vidur_total_ms(r) for r in VIDUR_LLAMA2_7B_A100]
    a, b = ols(batch, total)
    sync_a, sync_b = ols(batch, [vidur_sync_ms(r) for r in VIDUR_LLAMA2_7B_A100])
    gaps = [r[6] - r[3] for r in VIDUR_LLAMA2_7B_A100]  # prepare-inputs mean - median, ms
    per_token_ms = statistics.median(gaps) * VIDUR_DECODE_FACTOR / VIDUR_PROMPT_TOKENS
    return {"step_ms": a, "slope_ms": b, "sync_step_ms": sync_a, "sync_slope_ms": sync_b,
            "per_token_ms": per_token_ms, "batch": batch, "total_ms": total, "gaps_ms": gaps}


def output_processing_line() -> tuple[float, float]:
    """RFC #6913's _process_model_outputs time (ms) as o0 + o1 * batch, through its two batch sizes."""
    (b1, t1), (b2, t2) = RFC6913_OUTPUT_MS
    o1 = (t2 - t1) / (b2 - b1)
    return t1 - o1 * b1, o1


def sglang_line() -> dict:
    """SGLang's host time per decode iteration, h(B) = step + per_seq * B, through two measurements."""
    b1 = SGL_DECODE["running"]
    h1 = b1 / SGL_DECODE["tok_s_normal"] - b1 / SGL_DECODE["tok_s_overlap"]
    s = SGL_SATURATED
    b2 = (s["e2e_ms"] - s["ttft_ms"]) * MS * s["req_s"]  # Little's law: decoding requests in the system
    h2 = s["gain"] * b2 / s["out_tok_s"]  # without overlap each round of b2 tokens takes (1 + gain) times longer
    per_seq = (h2 - h1) / (b2 - b1)
    return {"b1": b1, "h1_s": h1, "b2": b2, "h2_s": h2, "per_seq_s": per_seq, "step_s": h1 - per_seq * b1}


def preset(request_s, step_s, per_seq_s, per_token_s, overlap, multistep, sources, derivation, assumed) -> dict:
    for v in (request_s, step_s, per_seq_s, per_token_s):
        assert v >= 0, (v, derivation)
    return {"request_s": sig(request_s), "step_s": sig(step_s), "per_seq_s": sig(per_seq_s),
            "per_token_s": sig(per_token_s), "overlap": bool(overlap), "multistep": int(multistep),
            "sources": list(sources), "derivation": derivation, "assumed": list(assumed)}


def derive_stacks() -> dict:
    v = fit_vidur()
    request_s = BLIS["alpha0"] * US
    req_note = "request_s: BLIS's vLLM V1 alpha0, borrowed (no public front-end figure for this stack)."

    # vllm-0.2: Vidur's rows.
    per_token = v["per_token_ms"] * MS
    v02 = preset(request_s, v["step_ms"] * MS, v["slope_ms"] * MS - per_token, per_token, False, 1,
                 ["vidur-cpu-overheads", "vidur-code", "blis-defaults"],
                 "Least squares of Vidur's per-iteration CPU time (Llama-2-7B, A100) = step_s + (per_seq_s + "
                 "per_token_s) * batch; per_token_s is the prefill's extra input preparation, from the mean - "
                 "median gap of prepare-inputs. " + req_note,
                 ["request_s"])

    # vllm-0.6: the v0.5.3 breakdown at light load, less the output processing async hides.
    e0_ms = V053_SCHED_SHARE * V053_LIGHT_TOKEN_MS
    o0, o1 = output_processing_line()
    per_seq6 = v["sync_slope_ms"] * MS - per_token
    h1_ms = e0_ms - (o0 + o1 * 1)  # batch 1 taken as "light load"
    step6 = h1_ms * MS - (per_seq6 + per_token) * 1
    v06_sources = ["vllm-v060-post", "vllm-rfc-6854", "vllm-rfc-6913", "vllm-pr-7049", "vidur-cpu-overheads",
                   "blis-defaults"]
    v06_text = (f"Host time per decode step at light load in v0.5.3 (29% of 13 ms = {e0_ms:.2f} ms, the post's "
                f"breakdown taken at that step; RFC #6854: ~4 ms) less the output processing async output overlaps "
                f"(RFC #6913: 0.2 ms at batch 1); the per-sequence and per-token slopes of the parts that still "
                f"block (schedule, sampler, prepare-inputs) are Vidur's, carried over. ")
    v06 = preset(request_s, step6, per_seq6, per_token, False, 1, v06_sources, v06_text + req_note,
                 ["request_s", "per_seq_s", "per_token_s"])
    v06m = preset(request_s, step6, per_seq6, per_token, False, V060_MULTISTEP, v06_sources,
                  v06_text + f"Paid once per {V060_MULTISTEP} decode-only steps (--num-scheduler-steps "
                  f"{V060_MULTISTEP}, the post's setting). " + req_note,
                  ["request_s", "per_seq_s", "per_token_s"])

    # vllm-v1: BLIS.
    v1 = preset(request_s, (BLIS["beta7"] + BLIS["alpha2"]) * US, BLIS["beta6"] * US, 0.0, False, 1,
                ["blis-defaults", "blis-registry", "blis-training-fit"],
                "BLIS's vLLM 0.15.1 fit: request_s = alpha0, step_s = beta7 + alpha2 (the per-output-token "
                "latency, one token per sequence per step), per_seq_s = beta6; the fit is additive, so these are "
                "the exposed host terms and overlap is off. Not carried: beta5 (per layer, GPU-side launch and "
                "norm time the roofline prices) and alpha1 (post-decode, end-to-end only).",
                ["per_token_s"])

    # sglang-0.4: two measurements of the hidden host time.
    sg = sglang_line()
    sgl = preset(request_s, sg["step_s"], sg["per_seq_s"], 0.0, True, 1,
                 ["sglang-pr-5608", "sglang-pr-1738", "sglang-v04-post", "blis-defaults"],
                 f"Overlap scheduler: host time h(B) = step_s + per_seq_s * B through the host time the overlap "
                 f"loop hid at {sg['b1']} decodes (PR #5608, {sg['h1_s'] / MS:.3f} ms) and at the saturated "
                 f"batch of PR #1738 (Little's law: {sg['b2']:.0f} decoding, 10% of the step: "
                 f"{sg['h2_s'] / MS:.2f} ms); wall = max(host, device). " + req_note,
                 ["request_s", "per_token_s"])

    # distserve: the vLLM-0.2 design; the code fixes the loop structure only.
    ds = preset(request_s, v02["step_s"], v02["per_seq_s"], v02["per_token_s"], False, 1,
                ["distserve-code", "distserve-profiles", "vidur-cpu-overheads", "blis-defaults"],
                "Known from the code: a Python asyncio loop per stage that schedules, makes one Ray actor call "
                "to the C++ workers, awaits it and detokenises each token before the next step (no overlap, one "
                "step per pass). Assumed: its costs equal vllm-0.2's engine (the same Python/Ray design and "
                "era); simdistserve's profiles fold host time into their fits and cannot separate it. " + req_note,
                ["request_s", "step_s", "per_seq_s", "per_token_s"])

    # semipd: the SGLang 0.4.4 fork, one scheduler process per worker.
    sp = preset(request_s, sgl["step_s"], sgl["per_seq_s"], sgl["per_token_s"], True, 1,
                ["semipd-code", "sglang-pr-5608", "sglang-pr-1738", "blis-defaults"],
                "Known from the code: SGLang 0.4.4.post1 with a prefill and a decode scheduler process; the "
                "decode worker runs the overlap loop, the prefill worker the normal (non-overlapped) loop. "
                "Assumed: each worker's host costs equal sglang-0.4's, and overlap is the decode worker's (one "
                "flag for both; a prefill iteration is long beside its host time). " + req_note,
                ["request_s", "step_s", "per_seq_s", "per_token_s", "overlap"])

    return {
        "ideal": preset(0.0, 0.0, 0.0, 0.0, False, 1, [], "No host cost: the GPU model alone.", []),
        "generic": preset(0.0, 1 * MS, 0.0, 0.0, False, 1, [],
                          "The uniform 1 ms of host time per iteration the simulator charged every engine before "
                          "these presets; kept to reproduce older numbers.", ["step_s"]),
        "vllm-0.2": v02, "vllm-0.6": v06, "vllm-0.6-multistep": v06m, "vllm-v1": v1,
        "sglang-0.4": sgl, "distserve": ds, "semipd": sp,
    }


def fit_error(stacks: dict) -> dict:
    """Per source, how the presets reproduce it (residuals printed by --report)."""
    v = fit_vidur()
    p = stacks["vllm-0.2"]
    pred = [(p["step_s"] + (p["per_seq_s"] + p["per_token_s"]) * b) / MS for b in v["batch"]]
    rel = [pr / m - 1 for pr, m in zip(pred, v["total_ms"])]
    sg = sglang_line()
    s = stacks["sglang-0.4"]
    return {
        "vidur-cpu-overheads": {
            "rows": len(rel), "max_abs_rel": sig(max(abs(r) for r in rel), 3),
            "rms_ms": sig((sum((pr - m) ** 2 for pr, m in zip(pred, v["total_ms"])) / len(rel)) ** 0.5, 3),
            "tolerance_rel": VIDUR_TOLERANCE},
        "sglang": {"points": 2, "note": "two points, two parameters: exact",
                   "max_abs_rel": sig(max(abs((s["step_s"] + s["per_seq_s"] * b) / h - 1)
                                          for b, h in ((sg["b1"], sg["h1_s"]), (sg["b2"], sg["h2_s"]))), 3)},
        "blis": {"note": "transcribed, not refitted; BLIS reports loss 34.57% for iter29"},
    }


def derive(today: str) -> dict:
    stacks = derive_stacks()
    return {
        "provenance": {
            "what": "serving-stack (host) cost presets for semipd_engine/sim/stack.py; all times in seconds",
            "sources": SOURCES,
            "date": today,
            "command": COMMAND,
        },
        "stacks": stacks,
        "fit_error": fit_error(stacks),
    }


# -- report ---------------------------------------------------------------------------------------------------
def print_report(cal: dict, file=None) -> None:
    def out(*a):
        print(*a, file=file or sys.stdout)

    out("presets (request ms | step ms, per sequence us, per token us | overlap, multistep | assumed)")
    for name, p in cal["stacks"].items():
        out(f"  {name:19} {p['request_s'] / MS:7.2f} | {p['step_s'] / MS:6.3f} {p['per_seq_s'] / US:7.2f} "
            f"{p['per_token_s'] / US:6.3f} | {str(p['overlap']):5} {p['multistep']:2d} | {','.join(p['assumed'])}")

    v = fit_vidur()
    p = cal["stacks"]["vllm-0.2"]
    out("\nvidur-cpu-overheads (Llama-2-7B, A100): per-iteration CPU ms, measured vs vllm-0.2")
    for b, m, g in zip(v["batch"], v["total_ms"], v["gaps_ms"]):
        pr = (p["step_s"] + (p["per_seq_s"] + p["per_token_s"]) * b) / MS
        out(f"  batch {b:5.0f}  measured {m:6.3f}  fit {pr:6.3f}  residual {pr - m:+6.3f} ({pr / m - 1:+6.1%})"
            f"  prepare mean-median {g:+.4f}")
    fe = cal["fit_error"]["vidur-cpu-overheads"]
    out(f"  max |rel| {fe['max_abs_rel']:.1%} (tolerance {VIDUR_TOLERANCE:.0%}), rms {fe['rms_ms']} ms; "
        f"per token {v['per_token_ms'] * 1e3:.3f} us from the median gap {statistics.median(v['gaps_ms']):.4f} ms")
    out(f"  synchronous parts only (schedule + sampler + prepare): {v['sync_step_ms']:.3f} ms + "
        f"{v['sync_slope_ms'] * 1e3:.2f} us * batch")

    o0, o1 = output_processing_line()
    e0 = V053_SCHED_SHARE * V053_LIGHT_TOKEN_MS
    out("\nvllm-0.6 anchors and cross-checks")
    out(f"  v0.5.3 light-load step: GPU {V053_GPU_SHARE * V053_LIGHT_TOKEN_MS:.2f} ms, engine host {e0:.2f} ms "
        f"(RFC #6854: ~{RFC6854_BUBBLE_MS:.0f} ms, {e0 / RFC6854_BUBBLE_MS - 1:+.0%}), API server "
        f"{V053_API_SHARE * V053_LIGHT_TOKEN_MS:.2f} ms (own process since v0.6.0)")
    out(f"  output processing (RFC #6913): {o0:.3f} ms + {o1 * 1e3:.1f} us * batch, hidden by async output")
    t = PR7743
    conc = [t["requests"] * (t["output_len"] - 1) * tpot * MS / t["duration_s"]
            for tpot in (t["tpot_sync_ms"], t["tpot_async_ms"])]
    lo, hi = (o0 + o1 * min(conc), o0 + o1 * max(conc))
    out(f"  PR #7743 (8-step multi-step): TPOT gain {t['tpot_sync_ms'] - t['tpot_async_ms']:.2f} ms per token; "
        f"RFC #6913's line at its {min(conc):.0f}-{max(conc):.0f} decoding requests (Little's law): "
        f"{lo:.1f}-{hi:.1f} ms")
    q = cal["stacks"]["vllm-0.6"]
    out(f"  vllm-0.6 exposed host: batch 1 {(q['step_s'] + q['per_seq_s'] + q['per_token_s']) / MS:.2f} ms, "
        f"batch 64 {(q['step_s'] + 64 * (q['per_seq_s'] + q['per_token_s'])) / MS:.2f} ms, "
        f"batch 256 {(q['step_s'] + 256 * (q['per_seq_s'] + q['per_token_s'])) / MS:.2f} ms")

    out("\nBLIS (vLLM 0.15.1, H100): iter29 transcribed; the training repository's earlier fit for the spread:")
    for k in ("alpha0", "beta5", "beta6", "beta7"):
        out(f"  {k:6} iter29 {BLIS[k]:10.2f} us   training fit {BLIS_TRAINING[k]:10.2f} us")

    sg = sglang_line()
    s = cal["stacks"]["sglang-0.4"]
    out("\nsglang-0.4: hidden host time per decode iteration (two points, exact)")
    for b, h in ((sg["b1"], sg["h1_s"]), (sg["b2"], sg["h2_s"])):
        pr = s["step_s"] + s["per_seq_s"] * b
        out(f"  batch {b:5.0f}  measured {h / MS:6.3f} ms  line {pr / MS:6.3f} ms  residual {pr / h - 1:+.1%}")

    out("\ndistserve-profiles (OPT-13B, TP1, A100-80GB, context 512): fitted iteration ms, vLLM vs DistServe")
    for b in (1, 8, 32, 64):
        t_v, t_d = ((a + bb * b * 512 + c * b) for a, bb, c in
                    (DISTSERVE_OPT13B_TP1["vllm"], DISTSERVE_OPT13B_TP1["distserve"]))
        out(f"  batch {b:3d}  vLLM {t_v:6.2f}  DistServe {t_d:6.2f}  gap {t_v - t_d:5.2f}  "
            f"(vllm-0.2 host here {(p['step_s'] + b * (p['per_seq_s'] + p['per_token_s'])) / MS:5.2f})")
    out(f"  DistServe idles {DISTSERVE_IDLE_SLEEP_S / MS:.0f} ms between polls of an empty stage (not charged)")


def dumps(obj: dict) -> str:
    """Indented JSON with each list of strings on one line."""
    text = json.dumps(obj, indent=1)
    return re.sub(r'\[(?:\s*"[^"\\]*",?)*\s*\]', lambda m: json.dumps(json.loads(m.group(0))), text) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="where to write the presets JSON (semipd_engine/sim/calibration/stacks.json)")
    ap.add_argument("--report", action="store_true", help="print the presets, residuals and cross-checks")
    args = ap.parse_args(argv)
    cal = derive(dt.date.today().isoformat())
    if args.out:
        Path(args.out).write_text(dumps(cal))
    if args.report or not args.out:
        print_report(cal)


if __name__ == "__main__":
    main()
