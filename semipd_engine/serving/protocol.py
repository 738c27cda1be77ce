"""OpenAI request validation -> (prompt, SamplingParams), and response shapes.

Every rejection is an `ApiError` that the server turns into an HTTP status and
an OpenAI-style body: {"error": {"message", "type", "param", "code"}}. Nothing
here trusts the body: JSON nesting is bounded, text must be valid Unicode, and a
text prompt too long to fit the context is refused before it is tokenized.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

from semipd_engine.core.request import MIN_TEMPERATURE, SamplingParams

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what a 64-bit generator seed can hold
MAX_JSON_DEPTH = 64  # no request of this API nests deeper than 4


class ApiError(Exception):
    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 type_: str = "invalid_request_error", code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type_, code
        self.headers = headers  # sent with the error (WWW-Authenticate on a 401)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_json_body(raw: bytes, charset: Optional[str] = None) -> Any:
    """Decode a request body (its Content-Type charset, default UTF-8) and parse it as JSON, depth-bounded."""
    charset = charset or "utf-8"
    try:
        text = raw.decode(charset)
    except LookupError:
        raise ApiError(f"unknown charset {charset!r} in the Content-Type header", code="unsupported_charset") from None
    except UnicodeDecodeError as e:
        raise ApiError(f"request body is not valid {charset}: {e.reason} at byte {e.start}") from None
    deep = text.count("[") + text.count("{") > MAX_JSON_DEPTH  # only then can it nest too deep
    try:
        body = json.loads(text)
    except RecursionError:
        body, deep = None, True
    except ValueError as e:
        raise ApiError(f"request body is not valid JSON: {e}") from None
    if deep and (body is None or _depth_exceeds(body, MAX_JSON_DEPTH)):
        raise ApiError(f"request body nests JSON deeper than {MAX_JSON_DEPTH} levels") from None
    return body


def _depth_exceeds(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:  # iterative: a deep body must not recurse the checker either
        o, d = stack.pop()
        if d > limit:
            return True
        children = o.values() if isinstance(o, dict) else o
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return False


def utf8_len(text: str, param: str) -> int:
    """Bytes of `text` in UTF-8; a 400 naming `param` when it is not valid Unicode (a lone surrogate)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ApiError(f"'{param}' is not valid Unicode: lone surrogate {text[e.start]!r} at character {e.start}",
                       param) from None


def _too_long(nbytes: int, max_bytes: int, max_model_len: int, param: str) -> ApiError:
    return ApiError(f"'{param}' is {nbytes} bytes of text, more than {max_model_len} tokens (the context limit) "
                    f"can hold", param, code="context_length_exceeded")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body, key, default, lo, hi):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(f"'{key}' must be a number, got {type(v).__name__}", key)
    if not lo <= v <= hi:
        raise ApiError(f"'{key}' must be in [{lo}, {hi}], got {v}", key)
    return float(v)


def _bool(body, key, default=False) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(f"'{key}' must be a boolean, got {type(v).__name__}", key)
    return v


def parse_sampling(body: dict, prompt_len: int, max_model_len: int) -> tuple[SamplingParams, bool, bool]:
    room = max_model_len - prompt_len
    if room <= 0:
        raise ApiError(f"prompt has {prompt_len} tokens; the context limit is {max_model_len} tokens", "prompt",
                       code="context_length_exceeded")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = min(16, room) if key == "max_tokens" and "messages" not in body else room
    if not _is_int(max_tokens) or max_tokens <= 0:
        raise ApiError(f"'{key}' must be a positive integer, got {max_tokens!r}", key)
    if max_tokens > room:
        raise ApiError(f"'{key}' is {max_tokens} but the prompt ({prompt_len} tokens) leaves room for only "
                       f"{room} within the context limit of {max_model_len}", key, code="context_length_exceeded")
    top_k = body.get("top_k", -1)
    if top_k is None:
        top_k = -1
    if not _is_int(top_k) or (top_k < 1 and top_k != -1):
        raise ApiError(f"'top_k' must be -1 (off) or a positive integer, got {top_k!r}", "top_k")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(f"'seed' must be an integer, got {seed!r}", "seed")
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
        raise ApiError(f"'seed' must be in [{SEED_MIN}, {SEED_MAX}] (a 64-bit seed), got {seed}", "seed")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError("'stop' must be a non-empty string or a list of non-empty strings", "stop")
    for s in stop:
        utf8_len(s, "stop")
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise ApiError(f"'n' is {n!r}: this server generates one choice per request (n=1)", "n",
                       code="unsupported_value")
    stream = _bool(body, "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError("'stream_options' must be an object", "stream_options")
    include_usage = _bool(opts, "include_usage")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    if temperature < MIN_TEMPERATURE:
        temperature = 0.0  # greedy: below the floor, logits / T would overflow (documented in the README)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        top_k=top_k, seed=seed, ignore_eos=_bool(body, "ignore_eos"), stop=tuple(stop),
    )
    return params, stream, include_usage


def parse_prompt(body: dict, vocab_size: int, max_bytes: int, max_model_len: int) -> str | list[int]:
    """The prompt: text to tokenize (valid Unicode, short enough to possibly fit), or checked token ids."""
    if "prompt" not in body:
        raise ApiError("'prompt' is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError("'prompt' must not be empty", "prompt")
        n = utf8_len(prompt, "prompt")
        if n > max_bytes:
            raise _too_long(n, max_bytes, max_model_len, "prompt")
        return prompt
    if isinstance(prompt, list):
        if not prompt:
            raise ApiError("'prompt' must not be empty", "prompt")
        if not all(_is_int(t) for t in prompt):
            raise ApiError("'prompt' must be a string or a list of token ids (integers); batches of several "
                           "prompts are not supported", "prompt")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ApiError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "prompt")
        return list(prompt)
    raise ApiError(f"'prompt' must be a string or a list of token ids, got {type(prompt).__name__}", "prompt")


# Roles a chat request may use. `developer` is OpenAI's newer name for `system` and is rendered as one; `tool`
# messages answer an assistant's `tool_calls`, which this server does not support, so they are refused with why.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
TEXT_PART = "text"
MEDIA_PARTS = ("image_url", "input_audio", "file", "video_url", "audio_url")


def _content_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of text parts joined by newlines (as vLLM does)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(f"'{where}' must be a string or a list of content parts, got "
                       f"{'null' if content is None else type(content).__name__}", where)
    if not content:
        raise ApiError(f"'{where}' must not be an empty list", where)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise ApiError(f"'{at}' must be an object with a string 'type'", at)
        if kind in MEDIA_PARTS:
            raise ApiError(f"'{at}': content parts of type {kind!r} are not supported: this model takes text only",
                           f"{at}.type", code="unsupported_value")
        if kind != TEXT_PART:
            raise ApiError(f"'{at}': unknown content part type {kind!r} (expected 'text')", f"{at}.type")
        if not isinstance(part.get("text"), str):
            raise ApiError(f"'{at}.text' must be a string", f"{at}.text")
        texts.append(part["text"])
    return "\n".join(texts)


def parse_messages(body: dict, has_chat_template: bool, max_bytes: int, max_model_len: int) -> list[dict]:
    """Chat messages, checked: known roles, content as a string or text parts, valid Unicode, short enough to fit."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError("'messages' must be a non-empty list", "messages")
    total, out = 0, []
    for i, m in enumerate(msgs):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(f"'{at}' must be an object with 'role' and 'content'", at)
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise ApiError(f"'{at}.role' must be one of {', '.join(CHAT_ROLES)}; got {role!r}", f"{at}.role")
        if m.get("tool_calls"):
            raise ApiError(f"'{at}.tool_calls': tool calls are not supported by this server", f"{at}.tool_calls",
                           code="unsupported_parameter")
        if role == "tool":
            raise ApiError(f"'{at}': a 'tool' message answers a preceding assistant message's 'tool_calls', and "
                           f"this server does not support tool calls", f"{at}.role", code="unsupported_value")
        if "content" not in m:
            raise ApiError(f"'{at}.content' is required", f"{at}.content")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise ApiError(f"'{at}.name' must be a string", f"{at}.name")
        text = _content_text(m["content"], f"{at}.content")
        total += utf8_len(text, f"{at}.content")
        out.append({"role": "system" if role == "developer" else role, "content": text})
    if total > max_bytes:
        raise _too_long(total, max_bytes, max_model_len, "messages")
    if not has_chat_template:
        raise ApiError("this model's tokenizer has no chat template; use /v1/completions", "messages")
    return out


# -- which request keys are honoured ------------------------------------------------------------------------------
_COMMON = frozenset({"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "stream",
                     "stream_options", "n", "max_completion_tokens", "return_token_ids"})
IMPLEMENTED = {"completions": _COMMON | {"prompt"}, "chat": _COMMON | {"messages"}}
# OpenAI keys that change nothing this server generates (bookkeeping, routing): accepted quietly.
NO_EFFECT = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


def _off(*values):
    return lambda v: v in (None, *values)


# OpenAI (and vLLM) parameters this server does not implement, with the values that ask for nothing; any other
# value is refused by name rather than silently ignored (a benchmark would measure something else than asked).
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "logprobs": (lambda v: v in (None, False), "it returns no log-probabilities"),
    "top_logprobs": (_off(0), "it returns no log-probabilities"),
    "echo": (_off(False), "it does not echo the prompt"),
    "best_of": (_off(1), "it generates one sequence per request"),
    "suffix": (_off(""), "it does not insert text"),
    "tools": (lambda v: v is None or v == [], "it does not call tools"),
    "tool_choice": (_off("none", "auto"), "it does not call tools"),
    "functions": (lambda v: v is None or v == [], "it does not call functions"),
    "function_call": (_off("none", "auto"), "it does not call functions"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, "it does not constrain the output format"),
    "logit_bias": (lambda v: v is None or v == {}, "it does not bias logits"),
    "presence_penalty": (_off(0), "it applies no penalties"),
    "frequency_penalty": (_off(0), "it applies no penalties"),
    "repetition_penalty": (_off(1), "it applies no penalties"),
    "min_tokens": (_off(0), "it has no minimum output length (use ignore_eos)"),
    "min_p": (_off(0), "it samples with temperature, top_p and top_k only"),
    "modalities": (lambda v: v is None or v == ["text"], "it answers in text only"),
    "audio": (_off(), "it answers in text only"),
    "prediction": (_off(), "it does not use predicted outputs"),
}


def check_keys(body: dict, endpoint: str) -> list[str]:
    """Refuse parameters this server does not implement (400 naming the first); return the unknown keys."""
    for key, (asks_nothing, why) in UNSUPPORTED.items():
        if key in body and not asks_nothing(body[key]):
            raise ApiError(f"'{key}' is not supported by this server: {why}", key, code="unsupported_parameter")
    known = IMPLEMENTED[endpoint] | NO_EFFECT | UNSUPPORTED.keys()
    return sorted(k for k in body if k not in known)


def chat_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: prompt tokens whose KV came from the prefix
    cache (as OpenAI and vLLM report them)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def return_token_ids(body: dict) -> bool:
    """vLLM's `return_token_ids`: the answer's ids (`choices[0].token_ids`, a stream's chunks carrying their delta)
    and the prompt's (`prompt_token_ids`: in the choice for completions, in the response for chat; a stream's first
    chunk only). A multi-turn client resends exactly the ids it got, as text would not re-encode to them."""
    return _bool(body, "return_token_ids")


def completion_body(rid: str, model: str, chat: bool, text: Optional[str], finish: Optional[str],
                    stream: bool, created: Optional[int] = None, first: bool = False,
                    token_ids: Optional[list[int]] = None, prompt_token_ids: Optional[list[int]] = None
                    ) -> dict[str, Any]:
    created = created or int(time.time())
    if chat:
        if stream:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        obj = "chat.completion.chunk" if stream else "chat.completion"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    if prompt_token_ids is not None:
        (body if chat else choice)["prompt_token_ids"] = prompt_token_ids
    return body
