"""Prompts of an exact token length."""

from __future__ import annotations

from experiments.loadgen.prompts import PromptBuilder
from semipd_engine.serving.tokenizer import builtin_tokenizer


def test_text_prompts_have_exact_token_lengths():
    tok = builtin_tokenizer()
    b = PromptBuilder(tok, seed=0)
    for n in (1, 7, 64, 500):
        text, got = b.text(n)
        assert got == n == len(tok.encode(text))
