from __future__ import annotations

import random

import pytest

from semipd_engine.serving.detokenizer import IncrementalDetokenizer
from semipd_engine.serving.tokenizer import builtin_tokenizer

TEXTS = ["Hello wörld, ça va? 🙂🙂 naïve — 漢字テキスト ok", "plain ascii text with spaces  and\nnewlines"]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_chunks_concatenate_to_full_decode_and_are_valid_utf8(text):
    tok = builtin_tokenizer()
    ids = tok.encode(text)
    rng = random.Random(0)
    d = IncrementalDetokenizer(tok)
    chunks, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        d.add(ids[i : i + n])
        i += n
        chunks.append(d.delta())
    d.finish()
    chunks.append(d.delta(final=True))
    assert "".join(chunks) == tok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)


def test_random_token_streams_never_emit_broken_utf8():
    tok = builtin_tokenizer()
    rng = random.Random(1)
    for _ in range(30):
        ids = [rng.randrange(5, len(tok)) for _ in range(40)]
        d = IncrementalDetokenizer(tok)
        out = []
        for t in ids:
            d.add([t])
            out.append(d.delta())
        d.finish()
        out.append(d.delta(final=True))
        assert "".join(out) == tok.decode(ids, skip_special_tokens=True)


def test_stop_string_across_tokens_is_cut_and_never_leaked():
    tok = builtin_tokenizer()
    text = "alpha beta gamma delta epsilon"
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, stop=("gamma del",))
    out = []
    for t in ids:
        d.add([t])
        out.append(d.delta())
        if d.stopped:
            break
    assert d.stopped
    out.append(d.delta(final=True))
    assert "".join(out) == "alpha beta "
