"""The sans-IO page-server codec: round trips, fragmentation, pipelining, bad input."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazymig.errors import LocalProtocolError, RemoteProtocolError
from lazymig.proto.constants import PAGE_SIZE, PE
from lazymig.proto.pageserver import (
    GET_CMD,
    NEED_DATA,
    AddPages,
    CloseReply,
    CloseRequest,
    ConnectionClosed,
    Event,
    GetReply,
    GetRequest,
    OpenReply,
    OpenRequest,
    PageData,
    PageServerConnection,
    ParentReply,
    ParentRequest,
    Role,
    State,
    _NeedData,  # the sentinel's type: what narrows the events
    check_get,
)
from lazymig.proto.wire import Cmd, DstType, WireVersion, encode_dst_id, pack_header

VERSIONS = list(WireVersion)


def drain(conn: PageServerConnection) -> list[Event]:
    events: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert not isinstance(event, _NeedData)
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return events


def merge_data(events: list[Event]) -> list[Event]:
    """Join PageData chunks so that differently fragmented streams compare equal."""
    merged: list[Event] = []
    for event in events:
        if isinstance(event, PageData) and merged and isinstance(merged[-1], PageData) \
                and not merged[-1].last:
            merged[-1] = PageData(merged[-1].data + event.data, event.last)
        else:
            merged.append(event)
    return merged


def feed_in_pieces(conn: PageServerConnection, data: bytes, cuts: list[int]) -> list[Event]:
    events: list[Event] = []
    start = 0
    for cut in sorted({*cuts, len(data)} - {0}):
        conn.receive_data(data[start:cut])  # never empty: b"" would mean EOF
        start = cut
        events += drain(conn)
    return merge_data(events)


def page(n: int) -> bytes:
    return bytes([n % 251]) * PAGE_SIZE


pids = st.integers(1, 2**31 - 1)
vaddrs = st.integers(0, 2**47 // PAGE_SIZE).map(lambda n: n * PAGE_SIZE)
counts = st.integers(1, 8)

client_requests = st.one_of(
    st.builds(GetRequest, pid=pids, vaddr=vaddrs, nr_pages=counts),
    st.builds(OpenRequest, dst_type=st.sampled_from(DstType), id=st.integers(1, 2**20),
              wants_reply=st.booleans()),
    st.builds(ParentRequest, dst_type=st.sampled_from(DstType), id=st.integers(1, 2**20)),
    st.builds(AddPages, dst_type=st.sampled_from(DstType), id=st.integers(1, 2**20),
              vaddr=vaddrs, nr_pages=counts,
              flags=st.sampled_from([PE.PRESENT, PE.PARENT, PE.LAZY, PE.LAZY | PE.PRESENT])),
)


def client_stream(client: PageServerConnection, requests: list[Event]) -> tuple[bytes, list[Event]]:
    """Encode requests (with their page data), return bytes and what the server should see."""
    out = b""
    expected: list[Event] = []
    for i, request in enumerate(requests):
        out += client.send(request)
        expected.append(request)
        if isinstance(request, AddPages) and request.flags & PE.PRESENT:
            data = b"".join(page(i + k) for k in range(request.nr_pages))
            out += client.send(PageData(data, last=True))
            expected.append(PageData(data, last=True))
    return out, expected


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(client_requests, min_size=1, max_size=6), data=st.data())
def test_requests_round_trip_under_any_fragmentation(version: WireVersion,
                                                     requests: list[Event],
                                                     data: st.DataObject) -> None:
    client = PageServerConnection(Role.CLIENT, version)
    server = PageServerConnection(Role.SERVER, version)
    wire, expected = client_stream(client, requests)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=12))
    assert feed_in_pieces(server, wire, cuts) == expected
    server.receive_data(b"")
    assert drain(server) == [ConnectionClosed(server.unanswered)]


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=60)
@given(gets=st.lists(st.tuples(pids, vaddrs, counts, st.integers(1, 8)), min_size=1,
                     max_size=6), data=st.data())
def test_pipelined_gets_with_short_replies(version: WireVersion,
                                           gets: list[tuple[int, int, int, int]],
                                           data: st.DataObject) -> None:
    client = PageServerConnection(Role.CLIENT, version)
    server = PageServerConnection(Role.SERVER, version)
    requests = [GetRequest(pid, vaddr, n) for pid, vaddr, n, _ in gets]
    server.receive_data(b"".join(client.send(r) for r in requests))
    assert drain(server) == requests
    replies = b""
    expected: list[Event] = []
    for request, (_, _, n, short) in zip(requests, gets, strict=True):
        served = min(n, short)
        payload = b"".join(page(request.vaddr // PAGE_SIZE + k) for k in range(served))
        replies += server.send(GetReply(request.pid, request.vaddr, served))
        replies += server.send(PageData(payload, last=True))
        expected += [GetReply(request.pid, request.vaddr, served), PageData(payload, True)]
    assert server.unanswered == 0
    cuts = data.draw(st.lists(st.integers(0, len(replies)), max_size=12))
    assert feed_in_pieces(client, replies, cuts) == expected
    assert client.unanswered == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_small_replies_and_close(version: WireVersion) -> None:
    client = PageServerConnection(Role.CLIENT, version)
    server = PageServerConnection(Role.SERVER, version)
    requests: list[Event] = [OpenRequest(DstType.PID, 42), ParentRequest(DstType.PID, 42),
                             CloseRequest()]
    server.receive_data(b"".join(client.send(r) for r in requests))
    assert drain(server) == requests
    assert server.state is State.CLOSING
    replies: list[Event] = [OpenReply(True), ParentReply(False), CloseReply(0)]
    wire = b"".join(server.send(r) for r in replies)
    assert wire == b"\x01" + b"\0" * 4 + b"\0" * 4
    assert feed_in_pieces(client, wire, [1, 2, 7]) == replies
    client.receive_data(b"")
    assert drain(client) == [ConnectionClosed(0)]
    assert client.state is State.CLOSED


def test_payload_received_directly() -> None:
    client = PageServerConnection(Role.CLIENT)
    server = PageServerConnection(Role.SERVER)
    server.receive_data(client.send(GetRequest(5, 0x1000, 2)))
    drain(server)
    client.receive_data(server.send(GetReply(5, 0x1000, 2)))
    assert drain(client) == [GetReply(5, 0x1000, 2)]
    assert client.payload_remaining == 2 * PAGE_SIZE
    client.payload_received_directly(2 * PAGE_SIZE)  # read straight into a page buffer
    assert client.payload_remaining == 0
    with pytest.raises(RemoteProtocolError, match="no request is outstanding"):
        client.receive_data(b"x")
        client.next_event()


@pytest.mark.parametrize("version", VERSIONS)
def test_payload_moved_into_a_buffer_of_ones_own(version: WireVersion) -> None:
    client = PageServerConnection(Role.CLIENT, version)
    server = PageServerConnection(Role.SERVER, version)
    server.receive_data(client.send(GetRequest(5, 0x1000, 2)) + client.send(
        GetRequest(5, 0x9000, 1)))
    drain(server)
    pages = page(1) + page(2)
    stream = (server.send(GetReply(5, 0x1000, 2)) + server.send(PageData(pages, last=True))
              + server.send(GetReply(5, 0x9000, 1)))
    target = bytearray(2 * PAGE_SIZE)
    view = memoryview(target)
    cut = version.header_size + PAGE_SIZE + 64  # a page and a bit of the payload first
    client.receive_data(stream[:cut])  # TCP cuts anywhere
    assert client.next_event() == GetReply(5, 0x1000, 2)
    assert client.receive_payload_into(view[:100]) == 100  # no more than the buffer holds
    assert client.receive_payload_into(view[100:]) == PAGE_SIZE + 64 - 100
    assert client.receive_payload_into(view) == 0  # nothing more buffered yet
    client.receive_data(stream[cut:])  # the rest, and the next reply's header
    assert client.receive_payload_into(view[PAGE_SIZE + 64:]) == PAGE_SIZE - 64
    assert bytes(target) == pages and client.payload_remaining == 0
    # the payload is over: what follows is the next header, not page data
    assert client.receive_payload_into(view) == 0
    assert drain(client) == [GetReply(5, 0x9000, 1)]
    client.receive_data(page(3)[:10])
    client.receive_data(b"")
    assert client.receive_payload_into(view) == 10
    with pytest.raises(RemoteProtocolError, match="bytes of page data missing"):
        client.receive_payload_into(view)
    assert client.state is State.ERROR


def raw_header(version: WireVersion, code: int, flags: int = 0, nr_pages: int = 1,
               vaddr: int = 0x1000, dst_id: int = 1) -> bytes:
    return pack_header(version, code, flags, nr_pages, vaddr, dst_id)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("header", "field"), [
    (dict(code=0x99), "cmd"),
    (dict(code=Cmd.GET, nr_pages=0), "nr_pages"),
    (dict(code=Cmd.GET, nr_pages=1025), "nr_pages"),
    (dict(code=Cmd.GET, vaddr=0x1234), "vaddr"),
    (dict(code=Cmd.GET, dst_id=0), "dst_id"),
    (dict(code=Cmd.GET, dst_id=2**40), "dst_id"),
    (dict(code=Cmd.GET, flags=PE.PRESENT), "flags"),
    (dict(code=Cmd.ADD_F, flags=PE.PRESENT, nr_pages=5000,
          dst_id=encode_dst_id(DstType.PID, 1)), "nr_pages"),
    (dict(code=Cmd.ADD_F, flags=PE.PRESENT | PE.PARENT,
          dst_id=encode_dst_id(DstType.PID, 1)), "flags"),
    (dict(code=Cmd.ADD_F, flags=0x80, dst_id=encode_dst_id(DstType.PID, 1)), "flags"),
    (dict(code=Cmd.OPEN2, dst_id=(7 << 8) | 0x55), "dst_id"),
    (dict(code=Cmd.ADD_F, flags=PE.LAZY, vaddr=2**64 - PAGE_SIZE, nr_pages=2,
          dst_id=encode_dst_id(DstType.PID, 1)), "nr_pages"),
])
def test_server_refuses_bad_requests_naming_the_field(version: WireVersion,
                                                      header: dict[str, int], field: str) -> None:
    server = PageServerConnection(Role.SERVER, version)
    server.receive_data(raw_header(version, **header))
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.field == field
    assert server.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        server.next_event()


@pytest.mark.parametrize("version", VERSIONS)
def test_server_refuses_data_after_close_and_truncation(version: WireVersion) -> None:
    server = PageServerConnection(Role.SERVER, version)
    server.receive_data(raw_header(version, Cmd.CLOSE, nr_pages=0) + b"junk")
    assert drain_until_error(server) == [CloseRequest()]
    truncated = PageServerConnection(Role.SERVER, version)
    truncated.receive_data(raw_header(version, Cmd.GET)[:10])
    assert truncated.next_event() is NEED_DATA
    truncated.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a message"):
        truncated.next_event()


def drain_until_error(conn: PageServerConnection) -> list[Event]:
    events: list[Event] = []
    with pytest.raises(RemoteProtocolError):
        while True:
            event = conn.next_event()
            assert event is not NEED_DATA
            assert not isinstance(event, _NeedData)
            events.append(event)
    return events


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("reply", "field"), [
    (dict(dst_id=2), "dst_id"),
    (dict(vaddr=0x2000), "vaddr"),
    (dict(nr_pages=3), "nr_pages"),
    (dict(nr_pages=0), "nr_pages"),
])
def test_client_refuses_mismatched_replies(version: WireVersion, reply: dict[str, int],
                                           field: str) -> None:
    client = PageServerConnection(Role.CLIENT, version)
    client.send(GetRequest(1, 0x1000, 2))
    fields: dict[str, int] = {"code": Cmd.ADD_F, "flags": PE.PRESENT, "nr_pages": 2,
                              "vaddr": 0x1000, "dst_id": 1, **reply}
    client.receive_data(raw_header(version, **fields))
    with pytest.raises(RemoteProtocolError) as info:
        client.next_event()
    assert info.value.field == field


def test_client_reports_eof_with_unanswered_requests() -> None:
    client = PageServerConnection(Role.CLIENT)
    client.send(GetRequest(1, 0x1000, 1))
    client.receive_data(b"")
    assert drain(client) == [ConnectionClosed(unanswered=1)]


def test_eof_in_the_middle_of_page_data() -> None:
    client = PageServerConnection(Role.CLIENT)
    client.send(GetRequest(1, 0x1000, 1))
    client.receive_data(raw_header(WireVersion.V2, Cmd.ADD_F, PE.PRESENT) + b"x" * 100)
    assert isinstance(client.next_event(), GetReply)
    assert client.next_event() == PageData(b"x" * 100, last=False)
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="page data missing"):
        client.next_event()


@pytest.mark.parametrize(("role", "event", "match"), [
    (Role.CLIENT, GetRequest(1, 0x1001, 1), "page-aligned"),
    (Role.CLIENT, GetRequest(1, 0x1000, 0), "nr_pages is 0"),
    (Role.CLIENT, GetRequest(0, 0x1000, 1), "invalid pid"),
    (Role.CLIENT, GetReply(1, 0x1000, 1), "does not send"),
    (Role.SERVER, GetRequest(1, 0x1000, 1), "does not send"),
    (Role.SERVER, GetReply(1, 0x1000, 1), "no request to answer"),
    (Role.CLIENT, PageData(b"x", last=True), "owed"),
])
def test_local_errors(role: Role, event: Event, match: str) -> None:
    conn = PageServerConnection(role)
    with pytest.raises(LocalProtocolError, match=match):
        conn.send(event)


def test_page_data_is_owed_before_the_next_header() -> None:
    client = PageServerConnection(Role.CLIENT, WireVersion.V1)
    client.send(AddPages(DstType.PID, 1, 0x1000, 2, PE.PRESENT))
    assert client.payload_owed == 2 * PAGE_SIZE
    with pytest.raises(LocalProtocolError, match="still owed"):
        client.send(CloseRequest())
    client2 = PageServerConnection(Role.CLIENT, WireVersion.V1)
    client2.send(AddPages(DstType.PID, 1, 0x1000, 2, PE.PRESENT))
    client2.payload_sent_directly(2 * PAGE_SIZE)  # e.g. spliced from a pipe
    assert client2.send(CloseRequest())


def test_v1_cannot_carry_more_than_u32_pages() -> None:
    client = PageServerConnection(Role.CLIENT, WireVersion.V1)
    with pytest.raises(LocalProtocolError, match="out of range"):
        client.send(AddPages(DstType.PID, 1, 0, 2**33, PE.LAZY))


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=150)
@given(garbage=st.binary(min_size=1, max_size=300), data=st.data())
def test_garbage_ends_in_a_protocol_error_or_need_data(role: Role, version: WireVersion,
                                                      garbage: bytes,
                                                      data: st.DataObject) -> None:
    conn = PageServerConnection(role, version)
    if role is Role.CLIENT:
        requests: list[Event] = [GetRequest(1, 0x1000, 4), OpenRequest(DstType.PID, 1),
                                 CloseRequest()]
        conn.send(data.draw(st.sampled_from(requests)))
    cuts = data.draw(st.lists(st.integers(0, len(garbage)), max_size=5))
    try:
        feed_in_pieces(conn, garbage, cuts)
        conn.receive_data(b"")
        for _ in range(len(garbage) + 3):  # bounded: a hang would be a bug
            if isinstance(conn.next_event(), ConnectionClosed):
                break
        else:
            pytest.fail("the codec never reached EOF")
    except RemoteProtocolError:
        assert conn.state is State.ERROR


@given(version=st.sampled_from(list(WireVersion)),
       pid=st.sampled_from([0, 1, 4000, (1 << 31) - 1, 1 << 31]),
       vaddr=st.sampled_from([0, 0x1000, 0x1800, (1 << 64) - 0x1000, 1 << 64]),
       nr_pages=st.sampled_from([0, 1, 16, 1024, 1 << 20]))
def test_a_get_packed_by_hand_is_what_send_builds(version: WireVersion, pid: int, vaddr: int,
                                                  nr_pages: int) -> None:
    """The daemon's page source packs its GETs itself (check_get, then the header struct
    with GET_CMD): the same bytes as send(), and the same errors."""
    client = PageServerConnection(Role.CLIENT, version, max_pages=1024)
    try:
        sent: object = client.send(GetRequest(pid, vaddr, nr_pages))
    except LocalProtocolError as exc:
        sent = f"{exc} ({exc.field})"
    try:
        check_get(pid, vaddr, nr_pages, 1024)
        packed: object = version.header_struct.pack(GET_CMD, nr_pages, vaddr, pid)
    except LocalProtocolError as exc:
        packed = f"{exc} ({exc.field})"
    assert packed == sent
