"""The built-in tokenizer's merges (derived from public chat text) and their measurement report."""

from __future__ import annotations

import json


def read_truncated_json_list(text: str) -> list:
    """The complete leading elements of a JSON list whose text may end mid-element ([] when it is no list).

    Copies of ShareGPT in circulation end mid-record; their complete records are still a sample of it.
    """
    stripped = text.lstrip()
    if not stripped.startswith("["):
        return []
    dec, i, out = json.JSONDecoder(), len(text) - len(stripped) + 1, []
    while True:
        while i < len(text) and text[i] in " \n\r\t,":
            i += 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return out
        out.append(obj)
