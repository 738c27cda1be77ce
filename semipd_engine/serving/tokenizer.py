"""Tokenizers: a local HF tokenizer directory, or the built-in byte-level BPE.

The built-in one is a 16,384-id byte-level BPE whose merges were learned from
real chat text (ShareGPT V3) with Llama 3's pre-tokenization rules, so prompts
and answers of real text come out about as long in tokens as under the paper's
models' tokenizers (measured: 3.6 / 4.2 characters per token on held-out
ShareGPT prompts / answers, against Llama 3's 4.1 / 4.7; see
``tokenizer_data/report.json`` and ``tokenizer_data/derive.py``), while the
vocabulary stays small enough for CPU models. It ships with the package (a
merges list), so it is the same on every machine and needs no download, and it
round-trips any UTF-8 text (byte-level alphabet).
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path
from typing import Optional

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
BUILTIN_SPECIAL_TOKENS = (PAD, BOS, EOS, "<|im_start|>", "<|im_end|>")
BUILTIN_VOCAB_SIZE = 16384  # special tokens, 256 bytes and the merges
MERGES_FILE = "builtin_bpe_merges.txt"
# GPT-4 / Llama 3 pre-tokenization: contractions, words with one leading non-letter, digits in groups of at most
# three, punctuation runs, newlines. Compression on English depends on these rules as much as on the vocabulary.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# ChatML-style template so /v1/chat/completions works with the built-in tokenizer.
BUILTIN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def synthetic_corpus(seed: int = 1234, num_lines: int = 20000) -> list[str]:
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
              "st", "tr", "pr", "ch", "sh", "th", "gr", "pl", "br", "cl"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "ie", "y"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "rt"]
    words = []
    for _ in range(6000):
        n = rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
        words.append("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(n)))
    weights = [1.0 / (r + 1) for r in range(len(words))]  # Zipf, like natural text
    lines = []
    for _ in range(num_lines):
        toks = rng.choices(words, weights, k=rng.randint(4, 24))
        if rng.random() < 0.3:
            toks.insert(rng.randrange(len(toks)), str(rng.randint(0, 10**rng.randint(1, 5))))
        s = " ".join(toks)
        s = s[0].upper() + s[1:] + rng.choice([".", ".", ".", "?", "!", ",", ":"])
        lines.append(s)
    return lines


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order (what the ByteLevel pre-tokenizer emits)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def builtin_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def builtin_from_merges(path: Path):
    """A `tokenizers.Tokenizer` from a merges list: ids are the special tokens, the bytes, then each merge."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    lines = Path(path).read_text(encoding="utf-8").split("\n")  # not splitlines(): no byte stand-in is a newline
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]  # the header; other lines may start with "#" (merges of "#" characters)
    merges = [tuple(ln.split(" ")) for ln in lines if ln]
    vocab = {t: i for i, t in enumerate([*BUILTIN_SPECIAL_TOKENS, *_byte_alphabet(), *(a + b for a, b in merges)])}
    if len(vocab) != BUILTIN_VOCAB_SIZE:
        raise ValueError(f"{path}: {len(vocab)} distinct tokens, expected {BUILTIN_VOCAB_SIZE}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = builtin_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BUILTIN_SPECIAL_TOKENS])
    return tok


@lru_cache(maxsize=4)
def builtin_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=builtin_from_merges(Path(__file__).parent / "tokenizer_data" / MERGES_FILE),
        bos_token=BOS, eos_token=EOS, pad_token=PAD, additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = BUILTIN_CHAT_TEMPLATE
    return tok


def load_tokenizer(path: Optional[str] = None):
    """The tokenizer at ``path`` (a HF directory), else the built-in BPE."""
    if not path:
        return builtin_tokenizer()
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def stop_token_ids(tokenizer, model_eos: tuple[int, ...] = ()) -> tuple[int, ...]:
    ids = set(model_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None:
        ids.add(im_end)
    return tuple(sorted(ids))
