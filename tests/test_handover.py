"""The restorer-daemon conversation: its sans-IO codec in memory (two connections linked
by a fake network, as h11's ConnectionPair), then the session over a real socketpair
with real fds passed across."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazymig.errors import LocalProtocolError, RemoteProtocolError
from lazymig.proto.handover import (
    PID_MAX_LIMIT,
    RESTORE_FINISHED,
    TRANSITIONS,
    ConnectionClosed,
    Event,
    Forked,
    Guarded,
    GuardianPresent,
    HandoverConnection,
    NeedData,
    RestoreFinished,
    Role,
    State,
    TaskHandover,
    TransferComplete,
    ZombieTask,
)
from lazymig.uffd.handover import HandoverSession, RestorerConnection
from lazymig.uffd.uffd import Uffd

# -- the codec alone ---------------------------------------------------------------------


class Pair:
    """A restorer and a daemon connection linked in memory: what one sends, the other
    receives, each segment as one read (the fds with it)."""

    def __init__(self) -> None:
        self.restorer = HandoverConnection(Role.RESTORER)
        self.daemon = HandoverConnection(Role.DAEMON)

    def send(self, sender: HandoverConnection, event: Event) -> list[Event]:
        """``sender`` says ``event``; the events the other end then reads."""
        receiver = self.daemon if sender is self.restorer else self.restorer
        for segment in sender.send(event):
            receiver.receive_data(segment.data, segment.fds)
        if isinstance(event, ConnectionClosed):
            receiver.receive_data(b"")
        events = []
        while not isinstance(got := receiver.next_event(), NeedData):
            events.append(got)
            if isinstance(got, ConnectionClosed):
                break
        return events


def test_the_whole_conversation() -> None:
    """lazymig's restorer and daemon: the handover, then the guardian's words."""
    pair = Pair()
    r, d = pair.restorer, pair.daemon
    assert pair.send(d, Guarded()) == [Guarded()]
    assert pair.send(r, TaskHandover(1234, 7)) == [TaskHandover(1234, 7)]
    assert pair.send(r, ZombieTask(77)) == [ZombieTask(77)]
    assert pair.send(r, RestoreFinished()) == [RestoreFinished()]
    assert (r.restorer_state, d.restorer_state) == (State.FINISHED, State.FINISHED)
    assert pair.send(r, GuardianPresent()) == [GuardianPresent()]
    assert pair.send(d, Forked(9)) == [Forked(9)]
    assert pair.send(d, TransferComplete()) == [TransferComplete()]
    assert pair.send(d, ConnectionClosed()) == [ConnectionClosed()]
    assert r.next_event() == ConnectionClosed()  # again and again
    assert (r.daemon_state, d.daemon_state) == (State.CLOSED, State.CLOSED)
    assert r.take_unclaimed_fds() == d.take_unclaimed_fds() == []


def test_criu_s_conversation() -> None:
    """CRIU's daemon says nothing; CRIU's restorer says nothing after "restore finished"."""
    pair = Pair()
    assert pair.send(pair.restorer, TaskHandover(1, 3)) == [TaskHandover(1, 3)]
    assert pair.send(pair.restorer, RestoreFinished()) == [RestoreFinished()]
    assert pair.send(pair.restorer, ConnectionClosed()) == [ConnectionClosed()]
    assert pair.daemon.daemon_state is State.SILENT


def test_the_bytes_are_criu_s() -> None:
    daemon = HandoverConnection(Role.RESTORER)
    word, carrier = daemon.send(TaskHandover(1234, 5))
    assert (word.data, word.fds) == (struct.pack("=i", 1234), ())
    assert (carrier.data, carrier.fds) == (b"\0", (5,))  # an fd of its own, not on the word
    assert [s.data for s in daemon.send(ZombieTask(77))] == [struct.pack("=i", -77)]
    assert [s.data for s in daemon.send(RestoreFinished())] == [b"FTSR"]
    assert struct.pack("<I", RESTORE_FINISHED) == b"FTSR"


@pytest.mark.parametrize("event", [GuardianPresent(), Guarded(), TransferComplete()])
def test_guardian_words_are_lazymig_s(event: Event) -> None:
    role = Role.RESTORER if isinstance(event, GuardianPresent) else Role.DAEMON
    connection = HandoverConnection(role, finished=True)
    if isinstance(event, GuardianPresent):
        connection.receive_data(b"LZGD")
        assert connection.next_event() == Guarded()
    if isinstance(event, TransferComplete):
        connection.send(Guarded())
    expected = {GuardianPresent: b"LZHI", Guarded: b"LZGD", TransferComplete: b"LZOK"}
    assert [s.data for s in connection.send(event)] == [expected[type(event)]]


@given(pid=st.integers(1, PID_MAX_LIMIT), fd=st.integers(0, 1 << 20))
def test_tasks_round_trip(pid: int, fd: int) -> None:
    pair = Pair()
    assert pair.send(pair.restorer, TaskHandover(pid, fd)) == [TaskHandover(pid, fd)]
    assert pair.send(pair.restorer, ZombieTask(pid)) == [ZombieTask(pid)]


@pytest.mark.parametrize("pid", [0, -1, PID_MAX_LIMIT + 1])
def test_bad_pids_are_refused_locally(pid: int) -> None:
    restorer = HandoverConnection(Role.RESTORER)
    with pytest.raises(LocalProtocolError):
        restorer.send(TaskHandover(pid, 3))
    assert restorer.our_state is State.ERROR


def test_no_forked_uffd_without_a_guardian() -> None:
    """An fd sent into a socket nobody reads would keep the child's uffd alive."""
    daemon = HandoverConnection(Role.DAEMON)
    daemon.send(Guarded())
    with pytest.raises(LocalProtocolError, match="LZFK before a guardian"):
        daemon.send(Forked(3))


def test_words_out_of_turn_are_refused() -> None:
    restorer = HandoverConnection(Role.RESTORER)
    with pytest.raises(LocalProtocolError):
        restorer.send(GuardianPresent())  # the daemon never said LZGD
    daemon = HandoverConnection(Role.DAEMON)
    with pytest.raises(LocalProtocolError):
        daemon.send(TaskHandover(1, 3))  # the restorer's word


def test_every_transition_is_reachable_from_a_start() -> None:
    """The table has no dead rows: each state in it is a start or some row's result."""
    starts = {State.HANDING_OVER, State.FINISHED, State.SILENT}
    reached = starts | set(TRANSITIONS.values())
    assert {state for state, _ in TRANSITIONS} <= reached


@pytest.mark.parametrize(("data", "fds", "match"), [
    (struct.pack("=i", 5) + b"\0", [], "carrying one uffd"),  # the byte, no SCM_RIGHTS
    (struct.pack("=i", 5) + b"\1", [9], "carrying one uffd"),  # a wrong carrier byte
    (struct.pack("=i", 5) + b"\0", [9, 10], "with 2 fds"),
    (struct.pack("=i", 5), [9], "came with the word"),  # the fd on the pid word
    (struct.pack("=i", 5)[:2], [], "closed after 2 of 4 bytes"),
    (struct.pack("=i", 5), [], "before sending its uffd"),
    (struct.pack("=i", 0), [], "neither a pid"),
    (b"FTSROOPS", [], "after restore finished"),
])
def test_a_broken_restorer_poisons_the_connection(data: bytes, fds: list[int],
                                                  match: str) -> None:
    daemon = HandoverConnection(Role.DAEMON)
    daemon.receive_data(data, fds)
    daemon.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=match):
        while not isinstance(daemon.next_event(), ConnectionClosed):
            pass
    assert daemon.their_state is State.ERROR
    assert sorted(daemon.take_unclaimed_fds()) == sorted(fds)  # every fd given back
    with pytest.raises(RemoteProtocolError):
        daemon.next_event()


def test_a_broken_daemon_poisons_the_connection() -> None:
    guardian = HandoverConnection(Role.RESTORER, finished=True)
    guardian.receive_data(b"LZGD")
    assert guardian.next_event() == Guarded()
    guardian.receive_data(b"LZFK", [7])  # a FORKED with no LZHI answered
    with pytest.raises(RemoteProtocolError, match="LZFK before a guardian"):
        guardian.next_event()
    assert guardian.take_unclaimed_fds() == [7]


# Arbitrary reads: bytes, some with fds, in any cut; EOF or not.
_reads = st.lists(st.tuples(st.binary(max_size=12), st.lists(st.integers(0, 999), max_size=3)),
                  max_size=12)
_known_words = st.sampled_from([b"LZGD", b"LZHI", b"LZFK", b"LZOK", b"FTSR", b"\0",
                                struct.pack("=i", 12), struct.pack("=i", -12)])
_reads_of_words = st.lists(st.tuples(_known_words, st.lists(st.integers(0, 999), max_size=2)),
                           max_size=12)


@given(role=st.sampled_from(Role), finished=st.booleans(), reads=_reads | _reads_of_words,
       eof=st.booleans())
def test_any_input_is_events_or_poison_never_a_crash(
        role: Role, finished: bool, reads: list[tuple[bytes, list[int]]], eof: bool) -> None:
    """Whatever a peer sends: events, or a RemoteProtocolError that leaves the connection
    in ERROR; every fd that came is either in an event or given back, once."""
    connection = HandoverConnection(role, finished=finished)
    received: list[int] = []
    handed_out: list[int] = []
    try:
        for data, fds in [*reads, *([(b"", [])] if eof else [])]:
            if not data and fds:
                continue  # a stream carries fds only with data
            received += fds
            connection.receive_data(data, fds)
            while not isinstance(event := connection.next_event(), NeedData):
                if isinstance(event, TaskHandover | Forked):
                    handed_out.append(event.fd)
                if isinstance(event, ConnectionClosed):
                    break
    except RemoteProtocolError:
        assert connection.their_state is State.ERROR
    given_back = connection.take_unclaimed_fds()
    assert sorted(handed_out + given_back) == sorted(received)


# -- the session, over a real socketpair -------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[HandoverSession, HandoverSession]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    b.setblocking(False)
    with HandoverSession(a, Role.RESTORER) as restorer, \
            HandoverSession(b, Role.DAEMON) as daemon:
        yield restorer, daemon


def open_fds() -> int:
    """How many fds this process has open."""
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


def same_file(a: int, b: int) -> bool:
    """Two fds on one open file (each userfaultfd has an anon inode of its own)."""
    return os.fstat(a).st_ino == os.fstat(b).st_ino


@pytest.mark.asyncio
async def test_fds_cross_and_stay_usable(pair: tuple[HandoverSession, HandoverSession]) -> None:
    restorer, daemon = pair
    with Uffd.open() as one, Uffd.open() as two:
        async with asyncio.timeout(5):
            await restorer.send(TaskHandover(1234, one.fd))
            await restorer.send(ZombieTask(77))
            await restorer.send(TaskHandover(99, two.fd))
            await restorer.send(RestoreFinished())
            await restorer.send(ConnectionClosed())
            first = await daemon.next_event()
            assert isinstance(first, TaskHandover)
            assert first.pid == 1234
            assert await daemon.next_event() == ZombieTask(77)
            second = await daemon.next_event()
            assert isinstance(second, TaskHandover)
            assert second.pid == 99
            assert await daemon.next_event() == RestoreFinished()
            assert await daemon.next_event() == ConnectionClosed()
        # The received fds are new fds on the uffds sent.
        assert first.fd not in (one.fd, two.fd)
        assert same_file(first.fd, one.fd)
        assert same_file(second.fd, two.fd)
        os.close(first.fd)
        os.close(second.fd)


@pytest.mark.asyncio
async def test_a_forked_uffd_reaches_the_guardian(
        pair: tuple[HandoverSession, HandoverSession]) -> None:
    restorer, daemon = pair
    restorer.connection = HandoverConnection(Role.RESTORER, finished=True)  # a guardian
    daemon.connection.restorer_state = State.FINISHED
    with Uffd.open() as uffd:
        async with asyncio.timeout(5):
            daemon.send_nowait(Guarded())
            assert await restorer.next_event() == Guarded()
            restorer.send_nowait(GuardianPresent())
            assert await daemon.next_event() == GuardianPresent()
            daemon.send_nowait(Forked(uffd.fd))
            forked = await restorer.next_event()
        assert isinstance(forked, Forked)
        assert same_file(forked.fd, uffd.fd)
        os.close(forked.fd)


@pytest.mark.asyncio
async def test_something_else_than_a_uffd_is_refused(
        pair: tuple[HandoverSession, HandoverSession]) -> None:
    restorer, daemon = pair
    read_end, write_end = os.pipe()
    try:
        await restorer.send(TaskHandover(5, read_end))
        before = open_fds()
        async with asyncio.timeout(5):
            with pytest.raises(RemoteProtocolError, match="not a userfaultfd but pipe:") as info:
                await daemon.next_event()
        assert info.value.field == "uffd"
        assert daemon.connection.their_state is State.ERROR
        assert open_fds() == before  # its copy received, then closed
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.asyncio
async def test_a_record_without_its_fd_closes_nothing_of_ours(
        pair: tuple[HandoverSession, HandoverSession]) -> None:
    restorer, daemon = pair
    raw = socket.socket(fileno=os.dup(restorer.fileno()))
    with raw:
        raw.send(struct.pack("=i", 5) + b"\0")  # the byte, but no SCM_RIGHTS
    async with asyncio.timeout(5):
        with pytest.raises(RemoteProtocolError) as info:
            await daemon.next_event()
    assert info.value.field == "uffd"


@pytest.mark.asyncio
async def test_a_stray_fd_is_closed(pair: tuple[HandoverSession, HandoverSession]) -> None:
    """An fd sent with a word that carries none is refused and closed, not leaked."""
    restorer, daemon = pair
    raw = socket.socket(fileno=os.dup(restorer.fileno()))
    read_end, write_end = os.pipe()
    with raw:
        socket.send_fds(raw, [struct.pack("=i", -5)], [read_end])  # a zombie with an fd
    before = open_fds()
    async with asyncio.timeout(5):
        with pytest.raises(RemoteProtocolError, match="came with the word"):
            await daemon.next_event()
    assert open_fds() == before  # received, then closed
    os.close(read_end)
    os.close(write_end)


@pytest.mark.asyncio
async def test_eof_inside_a_record(pair: tuple[HandoverSession, HandoverSession]) -> None:
    restorer, daemon = pair
    raw = socket.socket(fileno=os.dup(restorer.fileno()))
    with raw:
        raw.send(struct.pack("=i", 5)[:2])
    restorer.close()
    async with asyncio.timeout(5):
        with pytest.raises(RemoteProtocolError, match="after 2 of 4 bytes"):
            await daemon.next_event()


@pytest.mark.asyncio
async def test_eof_before_the_fd(pair: tuple[HandoverSession, HandoverSession]) -> None:
    restorer, daemon = pair
    raw = socket.socket(fileno=os.dup(restorer.fileno()))
    with raw:
        raw.send(struct.pack("=i", 5))
    restorer.close()
    async with asyncio.timeout(5):
        with pytest.raises(RemoteProtocolError, match="before sending its uffd"):
            await daemon.next_event()


@pytest.mark.asyncio
async def test_a_slow_sender_is_awaited(pair: tuple[HandoverSession, HandoverSession]) -> None:
    restorer, daemon = pair
    raw = socket.socket(fileno=os.dup(restorer.fileno()))
    with Uffd.open() as uffd, raw:
        async def late() -> None:
            word = struct.pack("=i", 8)
            for piece in (word[:1], word[1:]):
                await asyncio.sleep(0.05)
                raw.send(piece)
            await asyncio.sleep(0.05)
            socket.send_fds(raw, [b"\0"], [uffd.fd])

        async with asyncio.timeout(5), asyncio.TaskGroup() as tg:
            tg.create_task(late())
            record = await daemon.next_event()
        assert isinstance(record, TaskHandover)
        assert record.pid == 8
        assert same_file(record.fd, uffd.fd)
        os.close(record.fd)


# -- the daemon's end, in terms of processes --------------------------------------------


@pytest.fixture
def daemon_pair() -> Iterator[tuple[HandoverSession, RestorerConnection]]:
    """A restorer's session and the daemon's RestorerConnection over a socketpair (which
    says GUARDED at once)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    with HandoverSession(a, Role.RESTORER) as restorer, RestorerConnection(b, 0) as daemon:
        yield restorer, daemon


async def handed_over(daemon: RestorerConnection) -> list[TaskHandover | ZombieTask]:
    return [task async for task in daemon.handovers()]


@pytest.mark.asyncio
async def test_the_guardian_gets_forked_uffds_then_transfer_complete(
        daemon_pair: tuple[HandoverSession, RestorerConnection]) -> None:
    restorer, daemon = daemon_pair
    with Uffd.open() as uffd:
        async with asyncio.timeout(5):
            await restorer.send(ZombieTask(3))
            await restorer.send(RestoreFinished())
            assert await handed_over(daemon) == [ZombieTask(3)]
            daemon.adopted(1)
            daemon.adopted(2, forked=uffd)  # no guardian yet: kept for it
            serving = asyncio.create_task(daemon.until_settled())
            assert await restorer.next_event() == Guarded()
            await restorer.send(GuardianPresent())  # the guardian takes over this end
            forked = await restorer.next_event()
            assert isinstance(forked, Forked)
            assert same_file(forked.fd, uffd.fd)
            os.close(forked.fd)
            daemon.settled(1, ok=True)
            daemon.settled(2, ok=True)
            await serving
            assert await restorer.next_event() == TransferComplete()


@pytest.mark.asyncio
async def test_no_transfer_complete_unless_every_process_got_its_pages(
        daemon_pair: tuple[HandoverSession, RestorerConnection]) -> None:
    restorer, daemon = daemon_pair
    async with asyncio.timeout(5):
        await restorer.send(RestoreFinished())
        assert await handed_over(daemon) == []
        daemon.adopted(1)
        daemon.adopted(2)
        daemon.settled(1, ok=False)  # killed: its pages never came
        daemon.settled(2, ok=True)
        await daemon.until_settled()
        daemon.close()
        assert await restorer.next_event() == Guarded()
        assert await restorer.next_event() == ConnectionClosed()  # the guardian then kills


@pytest.mark.asyncio
async def test_a_guardian_breaking_the_protocol_is_closed(
        daemon_pair: tuple[HandoverSession, RestorerConnection],
        caplog: pytest.LogCaptureFixture) -> None:
    """Malformed input after "restore finished": that connection is closed with a logged
    reason; the processes it handed over are still the daemon's to settle."""
    restorer, daemon = daemon_pair
    async with asyncio.timeout(5):
        await restorer.send(RestoreFinished())
        assert await handed_over(daemon) == []
        daemon.adopted(1)
        serving = asyncio.create_task(daemon.until_settled())
        raw = socket.socket(fileno=os.dup(restorer.fileno()))
        with raw:
            raw.send(b"OOPS")
        assert await restorer.next_event() == Guarded()
        assert await restorer.next_event() == ConnectionClosed()  # closed on it
        assert "the restorer sent b'OOPS' after restore finished" in caplog.text
        assert not serving.done()
        daemon.settled(1, ok=True)
        await serving  # nothing to say TRANSFER_COMPLETE on any more: no error either


@pytest.mark.asyncio
async def test_eof_before_restore_finished_is_a_failed_restore(
        daemon_pair: tuple[HandoverSession, RestorerConnection]) -> None:
    restorer, daemon = daemon_pair
    got: list[TaskHandover | ZombieTask] = []
    async with asyncio.timeout(5):
        with Uffd.open() as uffd:
            await restorer.send(TaskHandover(5, uffd.fd))
        assert await restorer.next_event() == Guarded()  # else closing resets the connection
        restorer.close()
        with pytest.raises(RemoteProtocolError, match="before restore finished"):
            async for task in daemon.handovers():
                got.append(task)
    assert [t.pid for t in got] == [5]
    assert isinstance(got[0], TaskHandover)
    os.close(got[0].fd)


@pytest.mark.asyncio
async def test_a_fork_after_the_guardian_left_is_no_error(
        daemon_pair: tuple[HandoverSession, RestorerConnection]) -> None:
    """Its guardian ended (its process exited) while others of the tree go on forking:
    their uffds go nowhere, and nothing raises into the daemon."""
    restorer, daemon = daemon_pair
    async with asyncio.timeout(5):
        await restorer.send(RestoreFinished())
        assert await handed_over(daemon) == []
        daemon.adopted(1)
        serving = asyncio.create_task(daemon.until_settled())
        assert await restorer.next_event() == Guarded()
        await restorer.send(GuardianPresent())
        restorer.close()
        with Uffd.open() as one, Uffd.open() as two:
            daemon.adopted(2, forked=one)  # before the daemon's end read the EOF, or after
            await asyncio.sleep(0.05)
            daemon.adopted(3, forked=two)
            for key in (1, 2, 3):
                daemon.settled(key, ok=True)
            await serving
