"""Tokenizers: a local HF tokenizer directory, or a built-in byte-level BPE.

The built-in one is trained at first use on a seeded synthetic corpus (pseudo
words with a Zipf frequency law, punctuation, digits, newlines), so it is the
same on every machine, needs no download, and round-trips any UTF-8 text
(byte-level alphabet). It is cached under ~/.cache/semipd_engine.
"""

from __future__ import annotations

import hashlib
import os
import random
from functools import lru_cache
from pathlib import Path
from typing import Optional

BUILTIN_VOCAB_SIZE = 4096
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# ChatML-style template so /v1/chat/completions works with the built-in tokenizer.
BUILTIN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS_VERSION = "v1"


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


def _cache_dir() -> Path:
    root = os.environ.get("SEMIPD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "semipd_engine"))
    key = hashlib.sha1(f"{_CORPUS_VERSION}-{BUILTIN_VOCAB_SIZE}".encode()).hexdigest()[:10]
    return Path(root) / f"bpe-{key}"


def build_builtin_tokenizer(vocab_size: int = BUILTIN_VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(), trainer=trainer)
    return tok


@lru_cache(maxsize=4)
def builtin_tokenizer():
    from transformers import PreTrainedTokenizerFast

    path = _cache_dir() / "tokenizer.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        build_builtin_tokenizer().save(str(tmp))
        os.replace(tmp, path)  # atomic: concurrent first starts do not see half a file
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
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
