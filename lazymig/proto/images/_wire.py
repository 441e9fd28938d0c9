"""The protobuf wire format read without protobuf's runtime, for the few fields that a
lazy-pages daemon and a page server read: pids, a task's state, VMA bounds, pagemap
entries. protobuf's runtime costs about 4 MiB of resident memory and 15 ms of
start-up in a daemon whose start-up is part of a migration's downtime.

Bytes in, values out; malformed input raises ValueError. Scalars follow protobuf's
rule that the last occurrence of a field wins.
"""

from __future__ import annotations

__all__ = ["Fields", "fields", "scalar"]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

Fields = dict[int, list[int | bytes]]


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes")


def fields(data: bytes) -> Fields:
    """Every field of one message: ``{number: [value, ...]}`` in wire order, varints and
    fixed-size values as ints, length-delimited ones (strings, sub-messages, packed
    arrays) as bytes."""
    out: Fields = {}
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == _VARINT:
            value, pos = _varint(data, pos)
        elif wire == _LEN:
            size, pos = _varint(data, pos)
            if pos + size > end:
                raise ValueError(f"field {number} runs past the end of the message")
            value, pos = data[pos:pos + size], pos + size
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if pos + size > end:
                raise ValueError(f"field {number} runs past the end of the message")
            value, pos = int.from_bytes(data[pos:pos + size], "little"), pos + size
        else:
            raise ValueError(f"field {number} has wire type {wire}, which no image uses")
        if number == 0:
            raise ValueError("field number 0")
        out.setdefault(number, []).append(value)
    return out


def scalar(message: Fields, number: int, name: str, default: int | None = None) -> int:
    """Integer field ``number`` (called ``name`` in errors): required unless a
    ``default`` is given for its absence."""
    values = message.get(number)
    if not values:
        if default is None:
            raise ValueError(f"required field {name} is missing")
        return default
    if not isinstance(values[-1], int):
        raise ValueError(f"field {name} is not an integer")
    return values[-1]
