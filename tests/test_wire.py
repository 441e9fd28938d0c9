"""The page-server header: construct declaration vs the struct fast path, CRIU's bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazymig.proto.constants import PE
from lazymig.proto.spec import DECLARATIONS, HEADER_V1, HEADER_V2
from lazymig.proto.wire import (
    Cmd,
    DstType,
    WireVersion,
    decode_dst_id,
    encode_dst_id,
    pack_header,
    unpack_header,
)

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def test_sizes() -> None:
    assert HEADER_V1.sizeof() == WireVersion.V1.header_size == 24
    assert HEADER_V2.sizeof() == WireVersion.V2.header_size == 32


@pytest.mark.parametrize("version", list(WireVersion))
@pytest.mark.parametrize("code", list(Cmd))
@given(flags=st.integers(0, 0xFFFF), nr_pages=u32, vaddr=u64, dst_id=u64)
def test_fast_path_agrees_with_declaration(version: WireVersion, code: Cmd, flags: int,
                                           nr_pages: int, vaddr: int, dst_id: int) -> None:
    cmd = (flags << 16) | code
    declared = DECLARATIONS[version].build(
        {"cmd": cmd, "nr_pages": nr_pages, "vaddr": vaddr, "dst_id": dst_id})
    fast = pack_header(version, code, flags, nr_pages, vaddr, dst_id)
    assert fast == declared
    header = unpack_header(version, declared)
    parsed = DECLARATIONS[version].parse(fast)
    assert (header.cmd, header.nr_pages, header.vaddr, header.dst_id) == (
        parsed.cmd, parsed.nr_pages, parsed.vaddr, parsed.dst_id)
    assert (header.code, header.flags) == (code, flags)


def test_criu_example_bytes() -> None:
    # criu-lazy-pages-facts.md 1.1: GET from pid 1234 for 1 page at 0x7f0000001000.
    v1 = bytes.fromhex("07000000 01000000 0010000000 7f0000 d204000000000000".replace(" ", ""))
    assert pack_header(WireVersion.V1, Cmd.GET, 0, 1, 0x7F0000001000, 1234) == v1
    v2 = pack_header(WireVersion.V2, Cmd.GET, 0, 1, 0x7F0000001000, 1234)
    assert v2[:8] == bytes.fromhex("0700000000000000")
    assert v2[8:16] == (1).to_bytes(8, "little")
    assert v2[16:] == v1[8:]
    # ADD_F|PE_PRESENT, the GET reply's cmd.
    assert unpack_header(WireVersion.V2, pack_header(
        WireVersion.V2, Cmd.ADD_F, PE.PRESENT, 1, 0, 1)).cmd == 0x00040006


def test_v2_padding_is_ignored_on_receive() -> None:
    raw = bytearray(pack_header(WireVersion.V2, Cmd.GET, 0, 3, 0x1000, 7))
    raw[4:8] = b"\xde\xad\xbe\xef"
    assert unpack_header(WireVersion.V2, raw).nr_pages == 3


def test_dst_id() -> None:
    assert encode_dst_id(DstType.PID, 1234) == 0x4D201
    assert decode_dst_id(0x4D201) == (DstType.PID, 1234)
    assert decode_dst_id((5 << 8) | 2) == (DstType.SHMEM, 5)
    assert decode_dst_id((9 << 8) | 16) == (DstType.PID, 9)  # legacy CR_FD type byte
    with pytest.raises(ValueError, match="type byte"):
        decode_dst_id((9 << 8) | 99)
