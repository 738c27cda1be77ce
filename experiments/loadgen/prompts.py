"""Prompts of a requested token length, as text or as token ids.

Text is cut from a long pseudo-natural token stream and re-encoded; if the
round trip changes the count, the window is resized and tried again, so the
target tokenizer sees exactly the requested length (the residual mismatch is
reported). With no tokenizer, lengths are approximate (one word per token).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

# Seeds of the generators of shared parts (a group's prefix, a trace's block), apart from the requests' own.
GROUP_STREAM, BLOCK_STREAM, TURN_STREAM = 15485863, 32452843, 49979687
MESSAGE, ANSWER = 0, 1  # the parts of a conversation's turn


class PromptBuilder:
    def __init__(self, tokenizer=None, seed: int = 0, vocab_hint: int = 1000):
        self.tok = tokenizer
        self.seed = seed
        self._prefix_text: dict[tuple, str] = {}
        self.rng = np.random.default_rng(seed + 104729)
        from semipd_engine.serving.tokenizer import synthetic_corpus

        text = " ".join(synthetic_corpus(seed=4321, num_lines=4000))
        self.words = text.split()
        if tokenizer is not None:
            self.stream = tokenizer.encode(text, add_special_tokens=False)
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            self.id_pool = np.array([i for i in range(len(tokenizer)) if i not in special])
        else:
            self.stream = None
            self.id_pool = np.arange(10, vocab_hint)

    def token_ids(self, n: int) -> list[int]:
        return self.rng.choice(self.id_pool, size=n).tolist()

    def prefix_ids(self, group: int, n: int) -> list[int]:
        """Group `group`'s shared prefix as token ids: the same for every request of the group, in any run."""
        return np.random.default_rng((self.seed, GROUP_STREAM, group)).choice(self.id_pool, size=n).tolist()

    def block_ids(self, h: int, n: int) -> list[int]:
        """The `n` tokens a trace's content block `h` stands for: the same wherever `h` appears."""
        return np.random.default_rng((self.seed, BLOCK_STREAM, h)).choice(self.id_pool, size=n).tolist()

    def turn_ids(self, conversation: int, turn: int, part: int, n: int) -> list[int]:
        """A conversation turn's message or recorded answer as token ids: the same in any run, on either backend."""
        return np.random.default_rng((self.seed, TURN_STREAM, conversation, turn, part)).choice(
            self.id_pool, size=n).tolist()

    def turn_text(self, conversation: int, turn: int, part: int, n: int) -> str:
        """A conversation turn's message or recorded answer as text of about `n` tokens (not kept: each is sent
        in one conversation only)."""
        own, self.rng = self.rng, np.random.default_rng((self.seed, TURN_STREAM, conversation, turn, part))
        try:
            return self.text(n)[0]
        finally:
            self.rng = own

    def prefix_text(self, group: int, n: int) -> str:
        """Group `group`'s shared prefix as text of about `n` tokens (its requests share its whole-block prefix)."""
        return self._own_text((self.seed, GROUP_STREAM, group), n) + "\n\n"

    def block_text(self, h: int, n: int) -> str:
        """A trace's content block `h` as text of about `n` tokens (as text, sharing is approximate at the joins:
        token ids share exactly)."""
        return self._own_text((self.seed, BLOCK_STREAM, h), n) + " "

    def _own_text(self, seed: tuple, n: int) -> str:
        key = (*seed, n)
        if key not in self._prefix_text:
            own, self.rng = self.rng, np.random.default_rng(seed)
            try:  # its own generator: the requests' draws stay what they would be without shared parts
                self._prefix_text[key] = self.text(n)[0]
            finally:
                self.rng = own
        return self._prefix_text[key]

    def count(self, text, chat: bool = False) -> int:
        """Tokens the server will see: the text itself, or one user message under the chat template (or the
        messages given, a conversation's)."""
        if self.tok is None:
            return -1
        if chat or isinstance(text, list):
            from semipd_engine.serving.protocol import chat_token_ids

            messages = text if isinstance(text, list) else [{"role": "user", "content": text}]
            return len(chat_token_ids(self.tok, messages))
        return len(self.tok.encode(text))

    def text(self, n: int, chat: bool = False) -> tuple[str, int]:
        """(text, its token count under the target tokenizer; -1 when unknown).

        With `chat`, the count is of the whole prompt the server builds: one user message under the
        tokenizer's chat template, so a chat request has the same prompt length as a completions one.
        """
        if self.tok is None:
            start = int(self.rng.integers(0, len(self.words) - n - 1))
            return " ".join(self.words[start : start + n]), -1
        overhead = self.count("x", chat) - self.count("x") if chat else 0
        width = max(1, n - overhead)
        start = int(self.rng.integers(0, len(self.stream) - 2 * width - 8))
        best: Optional[tuple[str, int]] = None
        under: Optional[tuple[str, int]] = None  # the longest text found that is still short of n
        for _ in range(6):
            text = self.tok.decode(self.stream[start : start + width]).strip()
            got = self.count(text, chat)
            if best is None or abs(got - n) < abs(best[1] - n):
                best = (text, got)
            if got < n and (under is None or got > under[1]):
                under = (text, got)
            if got == n:
                return best
            width = max(1, width + (n - got))
        # The round trip can oscillate around n (a boundary merge adds or removes a token): pad the shorter text
        # with a common word, one token each under word-splitting tokenizers, and keep it only if exact.
        if under is not None:
            text = under[0] + " the" * (n - under[1])
            if self.count(text, chat) == n:
                return text, n
        return best


def turn_parts(builder: PromptBuilder, it, as_ids: bool) -> tuple:
    """(message, recorded answer) of a conversation turn, as token ids or as text (the dataset's where it has it)."""
    c, k = it.conversation, it.turn
    if as_ids:
        return builder.turn_ids(c, k, MESSAGE, it.user_len), builder.turn_ids(c, k, ANSWER, it.output_len)
    return (it.user_text if it.user_text is not None else builder.turn_text(c, k, MESSAGE, it.user_len),
            it.answer_text if it.answer_text is not None else builder.turn_text(c, k, ANSWER, it.output_len))


def prompt_token_ids(builder: PromptBuilder, it) -> list[int]:
    """A prompt as token ids: its group's shared prefix first, or its trace's content blocks, where it has them
    (the simulator builds the same ids, so both backends see the same sharing)."""
    if it.hash_blocks:
        ids = [t for h in it.hash_blocks for t in builder.block_ids(h, it.block_len)][: it.prompt_len]
        return ids + builder.token_ids(it.prompt_len - len(ids))
    if it.prefix_group is None:
        return builder.token_ids(it.prompt_len)
    return builder.prefix_ids(it.prefix_group, it.prefix_len) + builder.token_ids(it.prompt_len - it.prefix_len)
