"""What a workload's lengths look like, and whether a ShareGPT-style file's token counts are believable.

Every workload the load generator (or the simulator) loads is described by its prompt / output length
distribution in tokens; for real text it also states characters per token. A ShareGPT-style file counted with
a tokenizer that compresses English far worse or better than the paper's models' tokenizer gives requests of
the wrong size in tokens without any error, so such runs get a warning that names the ratio and the fix.

The reference is measured, not assumed: `semipd_engine/serving/tokenizer_data/report.json` holds Llama 3's tokenizer
(Llama 3 8B/70B, the paper's models) on held-out ShareGPT V3 first turns (`python -m
semipd_engine.serving.tokenizer_data.derive`).
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import numpy as np

from semipd_engine.serving import tokenizer_data

log = logging.getLogger(__name__)

REPORT = Path(tokenizer_data.__file__).parent / "report.json"
# Off by more than this factor in characters per token or in mean length: warn. Real tokenizers of current
# models sit within ~15% of Llama 3 on English chat (the built-in one 12% below it), so 1.33x is far.
FAR = 4 / 3


@lru_cache(maxsize=1)
def sharegpt_reference() -> dict[str, Any]:
    return json.loads(REPORT.read_text())["held_out"]["llama3"]


def _dist(xs: np.ndarray) -> dict[str, float]:
    if not len(xs):
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "max": float("nan")}
    return {"mean": round(float(xs.mean()), 1), "p50": float(np.percentile(xs, 50)),
            "p90": float(np.percentile(xs, 90)), "max": float(xs.max())}


def describe(workload) -> dict[str, Any]:
    """Length distribution of the planned requests (tokens), and characters per token where text is known."""
    items = workload.items
    p = np.array([it.prompt_len for it in items], dtype=float)
    o = np.array([it.output_len for it in items], dtype=float)
    out: dict[str, Any] = {"n": len(items), "prompt_tokens": _dist(p), "output_tokens": _dist(o)}
    if workload.num_conversations:  # prompts are histories: their lengths grow turn by turn
        out["conversations"] = workload.num_conversations
        out["turns_per_conversation"] = round(len(items) / workload.num_conversations, 2)
    text = [it for it in items if it.prompt_chars is not None]  # items with their real text's length
    if text:
        out["chars_per_token"] = {
            "prompt": round(sum(it.prompt_chars for it in text) / max(1, sum(it.prompt_len for it in text)), 3),
            "output": round(sum(it.output_chars for it in text) / max(1, sum(it.output_len for it in text)), 3),
        }
    return out


def sharegpt_warnings(stats: dict[str, Any], tokenizer: str, paper_filter: bool) -> list[str]:
    """Warnings for a ShareGPT-style file whose token lengths are far from those of the paper's tokenizer."""
    ref = sharegpt_reference()
    warnings = []
    cpt = stats.get("chars_per_token")
    if cpt:
        for part in ("prompt", "output"):
            ours, theirs = cpt[part], ref["chars_per_token"][part]
            if not 1 / FAR <= ours / theirs <= FAR:
                warnings.append(
                    f"the tokenizer ({tokenizer}) makes {ours:.2f} characters per token on this file's {part}s; "
                    f"Llama 3's tokenizer (the paper's models) makes {theirs:.2f} on ShareGPT V3, so {part}s come out "
                    f"~{theirs / ours:.1f}x as long in tokens as in the paper: name the model's tokenizer with "
                    f"loadgen.tokenizer=DIR (a local Hugging Face tokenizer directory)")
    if paper_filter:  # only then are the means comparable to the reference's
        mean = ref["mean_tokens_paper_filter"]
        for part, key in (("prompt", "prompt_tokens"), ("output", "output_tokens")):
            got, want = stats[key]["mean"], mean[part]
            if got and not 1 / FAR <= got / want <= FAR:
                warnings.append(
                    f"mean {part} length {got:.0f} tokens is {got / want:.2f}x the reference {want:.0f} (ShareGPT V3 "
                    f"first turns under Llama 3's tokenizer and the paper's filter, prompt <= 1024 and prompt + "
                    f"output <= 2048 tokens)")
    return warnings


def format_lengths(name: str, stats: dict[str, Any]) -> str:
    def d(k):
        s = stats[k]
        return f"mean {s['mean']:.0f}, p50 {s['p50']:.0f}, p90 {s['p90']:.0f}, max {s['max']:.0f}"

    line = f"workload {name}: {stats['n']} requests; prompt tokens {d('prompt_tokens')}; output tokens {d('output_tokens')}"
    cpt = stats.get("chars_per_token")
    if cpt:
        line += f"; {cpt['prompt']:.2f} / {cpt['output']:.2f} characters per prompt / output token"
    if stats.get("conversations"):
        line += f"; {stats['conversations']} conversations, {stats['turns_per_conversation']:g} turns each on average"
    return line


def report(workload, wcfg, tokenizer_name: Optional[str]) -> dict[str, Any]:
    """Describe `workload`, log it, and add warnings for ShareGPT-style files; the dict goes into the summary."""
    stats = describe(workload)
    log.info("%s", format_lengths(workload.name, stats))
    warnings: list[str] = []
    if wcfg.name == "sharegpt":
        paper = (wcfg.max_prompt_len == 1024 and wcfg.max_total_len == 2048 and wcfg.length_scale == 1.0
                 and not workload.num_conversations)  # the reference is of first turns
        warnings = sharegpt_warnings(stats, tokenizer_name or "none: 4 characters per token assumed", paper)
    for w in warnings:
        log.warning("workload %s: %s", workload.name, w)
    return {**stats, "warnings": warnings}
