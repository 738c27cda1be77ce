"""Thrift's compact protocol, read and written without an IDL: enough to edit a Parquet footer's offsets.

A Parquet file's footer (`FileMetaData`) is a compact-protocol struct. Every field carries its type on the wire, so
a struct reads into `{field id: (type, value)}` and writes back byte for byte (fields in id order, as Parquet's
writers emit them) without knowing parquet.thrift; a caller edits the few fields it knows by id. Lists are
`(element type, [values])`, maps `(key type, value type, [(key, value)])`, booleans `True`/`False`.
"""

from __future__ import annotations

import struct as _struct
from typing import Any

STOP, TRUE, FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(13)
Struct = dict[int, tuple[int, Any]]


class _Reader:
    def __init__(self, buf: bytes, pos: int = 0):
        self.buf, self.pos = buf, pos

    def varint(self) -> int:
        out = shift = 0
        while True:
            b = self.buf[self.pos]
            self.pos += 1
            out |= (b & 0x7F) << shift
            if not b & 0x80:
                return out
            shift += 7

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def value(self, t: int) -> Any:
        if t in (TRUE, FALSE):  # a container's element: one byte, 1 for true
            self.pos += 1
            return self.buf[self.pos - 1] == TRUE
        if t == BYTE:
            self.pos += 1
            return _struct.unpack_from("<b", self.buf, self.pos - 1)[0]
        if t in (I16, I32, I64):
            return self.zigzag()
        if t == DOUBLE:
            self.pos += 8
            return _struct.unpack_from("<d", self.buf, self.pos - 8)[0]
        if t == BINARY:
            n = self.varint()
            self.pos += n
            return bytes(self.buf[self.pos - n:self.pos])
        if t in (LIST, SET):
            head = self.buf[self.pos]
            self.pos += 1
            n = head >> 4 if head >> 4 != 15 else self.varint()
            return head & 0x0F, [self.value(head & 0x0F) for _ in range(n)]
        if t == MAP:
            n = self.varint()
            if not n:
                return 0, 0, []
            kv = self.buf[self.pos]
            self.pos += 1
            return kv >> 4, kv & 0x0F, [(self.value(kv >> 4), self.value(kv & 0x0F)) for _ in range(n)]
        if t == STRUCT:
            return self.struct()
        raise ValueError(f"thrift compact: unknown type {t} at byte {self.pos}")

    def struct(self) -> Struct:
        out: Struct = {}
        last = 0
        while True:
            head = self.buf[self.pos]
            self.pos += 1
            if head == STOP:
                return out
            t, delta = head & 0x0F, head >> 4
            fid = last + delta if delta else self.zigzag()
            out[fid] = (t, t == TRUE) if t in (TRUE, FALSE) else (t, self.value(t))
            last = fid


def loads(buf: bytes, pos: int = 0) -> tuple[Struct, int]:
    """The struct starting at `pos`, and where it ends."""
    r = _Reader(buf, pos)
    return r.struct(), r.pos


def _varint(out: bytearray, n: int) -> None:
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _zigzag(out: bytearray, n: int) -> None:
    _varint(out, n << 1 if n >= 0 else ((-n) << 1) - 1)


def _value(out: bytearray, t: int, v: Any) -> None:
    if t in (TRUE, FALSE):
        out.append(TRUE if v else FALSE)
    elif t == BYTE:
        out += _struct.pack("<b", v)
    elif t in (I16, I32, I64):
        _zigzag(out, v)
    elif t == DOUBLE:
        out += _struct.pack("<d", v)
    elif t == BINARY:
        _varint(out, len(v))
        out += v
    elif t in (LIST, SET):
        et, items = v
        if len(items) < 15:
            out.append(len(items) << 4 | et)
        else:
            out.append(0xF0 | et)
            _varint(out, len(items))
        for x in items:
            _value(out, et, x)
    elif t == MAP:
        kt, vt, items = v
        _varint(out, len(items))
        if items:
            out.append(kt << 4 | vt)
            for k, x in items:
                _value(out, kt, k)
                _value(out, vt, x)
    elif t == STRUCT:
        _struct_to(out, v)
    else:
        raise ValueError(f"thrift compact: unknown type {t}")


def _struct_to(out: bytearray, s: Struct) -> None:
    last = 0
    for fid in sorted(s):
        t, v = s[fid]
        if t in (TRUE, FALSE):
            t = TRUE if v else FALSE
        if 0 < fid - last <= 15:
            out.append((fid - last) << 4 | t)
        else:
            out.append(t)
            _zigzag(out, fid)
        if t not in (TRUE, FALSE):
            _value(out, t, v)
        last = fid
    out.append(STOP)


def dumps(s: Struct) -> bytes:
    out = bytearray()
    _struct_to(out, s)
    return bytes(out)
