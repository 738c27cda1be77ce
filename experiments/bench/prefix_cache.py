"""Prefix caching on the CPU engine: TTFT of a repeated long prompt, with the cache and without.

    python -m experiments.bench.prefix_cache [--model llama-100m] [--engine unified] [--prompt-tokens 1000]
        [--repeats 8] [--out FILE.json]

Two servers in turn, `engine.enable_prefix_caching` true and false, same model and dtype. Each gets the same
prompt (token ids) `--repeats` times, one request at a time, with 1 output token, so TTFT is the prefill. With the
cache the first request is cold and the others find every full block of the prompt cached (the last token, and
the partial block, are computed). Reported: each request's TTFT (client-side, streamed), the cached tokens the
server reported (usage), medians of the warm ones, and the ratio of the medians against the cached fraction.
The floor of a TTFT (HTTP, tokenization-free admission, one iteration, the LM head, the stream) is measured too:
the median TTFT of fresh 8-token prompts on the same server; what a cache can remove is the TTFT above it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request

import numpy as np

from experiments.bench.common import emit
from experiments.sweep.launch import EngineServer
from semipd_engine.config import EngineConfig, ModelConfig, ServerConfig, freeze


def ttft(url: str, prompt: list[int]) -> tuple[float, int]:
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, cached = None, -1
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            obj = json.loads(line[6:])
            if first is None and obj.get("choices"):
                first = time.perf_counter() - t0
            if obj.get("usage"):
                cached = obj["usage"]["prompt_tokens_details"]["cached_tokens"]
    return first, cached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="llama-100m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--engine", default="unified")
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    prompt = rng.integers(10, 16000, args.prompt_tokens).tolist()
    res: dict = {"model": args.model, "engine": args.engine, "prompt_tokens": args.prompt_tokens, "runs": {}}
    for caching in (True, False):
        with tempfile.TemporaryDirectory() as d:
            mcfg = freeze(ModelConfig, {"name": args.model, "dtype": args.dtype})
            ecfg = freeze(EngineConfig, {"name": args.engine, "enable_prefix_caching": caching,
                                         "max_num_batched_tokens": max(2048, args.prompt_tokens)})
            with EngineServer(mcfg, ecfg, freeze(ServerConfig, {}), d) as srv:
                ttft(srv.url, rng.integers(10, 16000, 64).tolist())  # warm the server's paths, another prompt
                runs = [ttft(srv.url, prompt) for _ in range(args.repeats)]
                floor = float(np.median([ttft(srv.url, rng.integers(10, 16000, 8).tolist())[0]
                                         for _ in range(args.repeats)]))
        warm = [t for t, _ in runs[1:]]
        res["runs"]["on" if caching else "off"] = {
            "ttft_s": [t for t, _ in runs], "cached_tokens": [c for _, c in runs],
            "cold_ttft_s": runs[0][0], "warm_ttft_s_median": float(np.median(warm)),
            "warm_ttft_s_min_max": [float(min(warm)), float(max(warm))], "floor_ttft_s": floor}
        print(f"prefix caching {'on ' if caching else 'off'}: cold {runs[0][0] * 1e3:.1f} ms, repeated "
              f"{np.median(warm) * 1e3:.1f} ms median ({min(warm) * 1e3:.1f}-{max(warm) * 1e3:.1f}), cached tokens "
              f"{[c for _, c in runs]}", flush=True)
    on, off = res["runs"]["on"], res["runs"]["off"]
    cached = on["cached_tokens"][-1] / args.prompt_tokens
    res["ttft_ratio_on_off"] = on["warm_ttft_s_median"] / off["warm_ttft_s_median"]
    res["cached_fraction"] = cached
    res["above_floor_ratio_on_off"] = ((on["warm_ttft_s_median"] - on["floor_ttft_s"])
                                       / (off["warm_ttft_s_median"] - off["floor_ttft_s"]))
    print(f"repeated prompt TTFT with the cache / without: {res['ttft_ratio_on_off']:.3f} "
          f"(cached fraction {cached:.3f}: the target is a fall by at least it, i.e. a ratio <= {1 - cached:.3f}); "
          f"above the {on['floor_ttft_s'] * 1e3:.1f} / {off['floor_ttft_s'] * 1e3:.1f} ms floor: "
          f"{res['above_floor_ratio_on_off']:.3f}")
    emit(res, args.out)


if __name__ == "__main__":
    main()
