"""lazymig.proto.uffd: struct layouts, ioctl numbers, and message decoding (no kernel)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazymig.errors import RemoteProtocolError
from lazymig.proto import spec
from lazymig.proto import uffd as p

U64 = st.integers(0, 2**64 - 1)
S64 = st.integers(-(2**63), 2**63 - 1)
U32 = st.integers(0, 2**32 - 1)

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    """The kernel's _IOC(dir, type=0xAA, nr, size) (asm-generic/ioctl.h)."""
    return (direction << 30) | (size << 16) | (0xAA << 8) | nr


@pytest.mark.parametrize(
    ("decl", "size"),
    [
        (spec.uffd_msg, None),
        (spec.uffdio_api, 24),
        (spec.uffdio_range, 16),
        (spec.uffdio_register, 32),
        (spec.uffdio_copy, 40),
        (spec.uffdio_zeropage, 32),
        (spec.uffdio_writeprotect, 24),
        (spec.uffdio_continue, 32),
        (spec.uffdio_poison, 32),
        (spec.uffdio_move, 40),
    ],
)
def test_struct_sizes(decl: object, size: int | None) -> None:
    if size is None:  # uffd_msg: every union member is padded to 24 bytes
        for code in p.EventCode:
            built = spec.uffd_msg.build(_msg_dict(code))
            assert len(built) == p.MSG_SIZE == 32
        return
    assert decl.sizeof() == size  # type: ignore[attr-defined]


RW = _IOC_READ | _IOC_WRITE


@pytest.mark.parametrize(
    ("value", "direction", "nr", "decl"),
    [
        (p.UFFDIO_API, RW, 0x3F, spec.uffdio_api),
        (p.UFFDIO_REGISTER, RW, 0x00, spec.uffdio_register),
        (p.UFFDIO_UNREGISTER, _IOC_READ, 0x01, spec.uffdio_range),
        (p.UFFDIO_WAKE, _IOC_READ, 0x02, spec.uffdio_range),
        (p.UFFDIO_COPY, RW, 0x03, spec.uffdio_copy),
        (p.UFFDIO_ZEROPAGE, RW, 0x04, spec.uffdio_zeropage),
        (p.UFFDIO_MOVE, RW, 0x05, spec.uffdio_move),
        (p.UFFDIO_WRITEPROTECT, RW, 0x06, spec.uffdio_writeprotect),
        (p.UFFDIO_CONTINUE, RW, 0x07, spec.uffdio_continue),
        (p.UFFDIO_POISON, RW, 0x08, spec.uffdio_poison),
    ],
)
def test_ioctl_numbers_follow_ioc_formula(value: int, direction: int, nr: int,
                                          decl: object) -> None:
    assert value == _ioc(direction, nr, decl.sizeof())  # type: ignore[attr-defined]
    assert p.Ioctl(1 << nr)  # the mask bit of that ioctl is named


def test_misc_constants() -> None:
    assert _ioc(_IOC_NONE, 0x00, 0) == p.USERFAULTFD_IOC_NEW
    assert p.UFFD_API == 0xAA
    assert p.NR_USERFAULTFD["x86_64"] == 323
    assert p.NR_USERFAULTFD["aarch64"] == 282
    assert [e.value for e in p.EventCode] == [0x12, 0x13, 0x14, 0x15, 0x16]
    # CRIU's restorer asks for exactly these four: 0x4E.
    crirequest = (p.Feature.EVENT_FORK | p.Feature.EVENT_REMAP | p.Feature.EVENT_REMOVE
                  | p.Feature.EVENT_UNMAP)
    assert crirequest == 0x4E
    assert p.Feature.MOVE == 1 << 16


def test_feature_names() -> None:
    assert p.feature_names(0) == []
    assert p.feature_names(p.Feature.EVENT_FORK | p.Feature.THREAD_ID) == [
        "EVENT_FORK", "THREAD_ID"]
    assert p.feature_names(p.Feature.EVENT_UNMAP | 1 << 40) == ["EVENT_UNMAP", hex(1 << 40)]


# ----------------------------------------------------------------------------- struct mirrors


@given(U64, U64, U64)
def test_api_mirror(a: int, b: int, c: int) -> None:
    built = spec.uffdio_api.build({"api": a, "features": b, "ioctls": c})
    assert built == p.API_STRUCT.pack(a, b, c)


@given(U64, U64, U64, U64)
def test_register_mirror(start: int, length: int, mode: int, ioctls: int) -> None:
    built = spec.uffdio_register.build(
        {"range": {"start": start, "len": length}, "mode": mode, "ioctls": ioctls})
    assert built == p.REGISTER_STRUCT.pack(start, length, mode, ioctls)
    assert spec.uffdio_range.build({"start": start, "len": length}) == p.RANGE_STRUCT.pack(
        start, length)


@given(U64, U64, U64, U64, S64)
def test_copy_and_move_mirror(dst: int, src: int, length: int, mode: int, out: int) -> None:
    d = {"dst": dst, "src": src, "len": length, "mode": mode}
    assert spec.uffdio_copy.build({**d, "copy": out}) == p.COPY_STRUCT.pack(dst, src, length,
                                                                          mode, out)
    assert spec.uffdio_move.build({**d, "move": out}) == p.MOVE_STRUCT.pack(dst, src, length,
                                                                          mode, out)
    parsed = spec.uffdio_copy.parse(p.COPY_STRUCT.pack(dst, src, length, mode, out))
    assert parsed["copy"] == out  # (Container.copy is a method)


@given(U64, U64, U64, S64)
def test_range_mode_out_mirrors(start: int, length: int, mode: int, out: int) -> None:
    rng = {"start": start, "len": length}
    assert spec.uffdio_zeropage.build({"range": rng, "mode": mode, "zeropage": out}) == \
        p.ZEROPAGE_STRUCT.pack(start, length, mode, out)
    assert spec.uffdio_continue.build({"range": rng, "mode": mode, "mapped": out}) == \
        p.CONTINUE_STRUCT.pack(start, length, mode, out)
    assert spec.uffdio_writeprotect.build({"range": rng, "mode": mode}) == \
        p.WRITEPROTECT_STRUCT.pack(start, length, mode)


# ----------------------------------------------------------------------------- messages


def _msg_dict(code: int, a: int = 0, b: int = 0, c: int = 0) -> dict[str, object]:
    arg: object
    if code == p.EventCode.PAGEFAULT:
        arg = {"flags": a, "address": b, "ptid": c & 0xFFFFFFFF}
    elif code == p.EventCode.FORK:
        arg = {"ufd": a & 0xFFFFFFFF}
    elif code == p.EventCode.REMAP:
        arg = {"from_": a, "to": b, "len": c}
    else:
        arg = {"start": a, "end": b}
    return {"event": code, "reserved1": 0, "reserved2": 0, "reserved3": 0, "arg": arg}


def _expected(code: int, a: int, b: int, c: int) -> p.Event:
    if code == p.EventCode.PAGEFAULT:
        return p.Pagefault(b, a, c & 0xFFFFFFFF)
    if code == p.EventCode.FORK:
        return p.Fork(a & 0xFFFFFFFF)
    if code == p.EventCode.REMAP:
        return p.Remap(a, b, c)
    if code == p.EventCode.REMOVE:
        return p.Remove(a, b)
    return p.Unmap(a, b)


MSGS = st.lists(st.tuples(st.sampled_from(list(p.EventCode)), U64, U64, U64), max_size=8)


@given(MSGS)
def test_decode_agrees_with_construct(msgs: list[tuple[p.EventCode, int, int, int]]) -> None:
    data = b"".join(spec.uffd_msg.build(_msg_dict(*m)) for m in msgs)
    assert len(data) == 32 * len(msgs)
    events = p.decode_events(data)
    assert events == [_expected(*m) for m in msgs]
    assert p.decode_events(memoryview(data)) == events
    assert p.decode_events(bytearray(data)) == events
    # and construct parses what it built back to the same fields
    for i, m in enumerate(msgs):
        parsed = spec.uffd_msg.parse(data[32 * i: 32 * i + 32])
        assert parsed.event == m[0]


def test_pagefault_layout_by_hand() -> None:
    raw = struct.pack("=BBHIQQI4x", 0x12, 0, 0, 0, p.PagefaultFlag.WRITE, 0x7F0000001000, 42)
    (event,) = p.decode_events(raw)
    assert event == p.Pagefault(address=0x7F0000001000, flags=1, ptid=42)
    assert isinstance(event, p.Pagefault)
    assert event.write


def test_events_are_frozen() -> None:
    ev = p.Remove(0, 4096)
    with pytest.raises(AttributeError):
        ev.start = 1  # type: ignore[misc]


def test_decode_rejects_bad_input() -> None:
    assert p.decode_events(b"") == []
    with pytest.raises(RemoteProtocolError) as info:
        p.decode_events(b"\x12" * 33)
    assert info.value.field == "length"
    with pytest.raises(RemoteProtocolError) as info:
        p.decode_events(spec.uffd_msg.build(_msg_dict(0x12)) + b"\x77" + bytes(31))
    assert info.value.field == "event"
    assert "0x77" in str(info.value)
