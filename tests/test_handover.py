"""The restore-to-daemon handover over a real socketpair, with a real fd passed across."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazymig.errors import LocalProtocolError, RemoteProtocolError
from lazymig.proto.handover import (
    PID_MAX_LIMIT,
    RESTORE_FINISHED,
    RestoreFinished,
    TaskHandover,
    ZombieTask,
    decode_word,
    encode_restore_finished,
    encode_task,
    encode_zombie,
)
from lazymig.uffd.handover import (
    ReceivedTask,
    receive_record,
    send_restore_finished,
    send_task,
    send_zombie,
)
from lazymig.uffd.uffd import Uffd


def test_marker_bytes_are_criu_s() -> None:
    assert encode_restore_finished() == b"FTSR" == struct.pack("<I", RESTORE_FINISHED)


@given(pid=st.integers(1, PID_MAX_LIMIT))
def test_words_round_trip(pid: int) -> None:
    assert decode_word(encode_task(pid)) == TaskHandover(pid)
    assert decode_word(encode_zombie(pid)) == ZombieTask(pid)


@given(word=st.binary(min_size=0, max_size=6))
def test_any_word_decodes_or_is_a_protocol_error(word: bytes) -> None:
    try:
        record = decode_word(word)
    except RemoteProtocolError as exc:
        assert exc.field == "pid"
    else:
        assert isinstance(record, TaskHandover | ZombieTask | RestoreFinished)


@pytest.mark.parametrize("pid", [0, -1, PID_MAX_LIMIT + 1])
def test_bad_pids_are_refused_locally(pid: int) -> None:
    with pytest.raises(LocalProtocolError):
        encode_task(pid)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def same_file(a: int, b: int) -> bool:
    """Two fds on one open file (each userfaultfd has an anon inode of its own)."""
    return os.fstat(a).st_ino == os.fstat(b).st_ino


@pytest.mark.asyncio
async def test_fd_crosses_and_stays_usable(pair: tuple[socket.socket, socket.socket]) -> None:
    restorer, daemon = pair
    with Uffd.open() as one, Uffd.open() as two:
        async with asyncio.timeout(5):
            await send_task(restorer, 1234, one.fd)
            await send_zombie(restorer, 77)
            await send_task(restorer, 99, two.fd)
            await send_restore_finished(restorer)
            restorer.shutdown(socket.SHUT_WR)
            first = await receive_record(daemon)
            assert isinstance(first, ReceivedTask)
            assert first.pid == 1234
            assert await receive_record(daemon) == ZombieTask(77)
            second = await receive_record(daemon)
            assert isinstance(second, ReceivedTask)
            assert second.pid == 99
            assert await receive_record(daemon) == RestoreFinished()
            assert await receive_record(daemon) is None
        # The received fds are new fds on the uffds sent.
        assert first.fd not in (one.fd, two.fd)
        assert same_file(first.fd, one.fd)
        assert same_file(second.fd, two.fd)
        os.close(first.fd)
        os.close(second.fd)


@pytest.mark.asyncio
async def test_record_without_fd_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    restorer, daemon = pair
    restorer.send(encode_task(5) + b"\0")  # the byte, but no SCM_RIGHTS
    async with asyncio.timeout(5):
        with pytest.raises(RemoteProtocolError) as info:
            await receive_record(daemon)
    assert info.value.field == "uffd"


@pytest.mark.asyncio
async def test_eof_inside_a_record(pair: tuple[socket.socket, socket.socket]) -> None:
    restorer, daemon = pair
    restorer.send(encode_task(5)[:2])
    restorer.shutdown(socket.SHUT_WR)
    async with asyncio.timeout(5):
        with pytest.raises(RemoteProtocolError, match="after 2 of 4 bytes"):
            await receive_record(daemon)


@pytest.mark.asyncio
async def test_eof_before_the_fd(pair: tuple[socket.socket, socket.socket]) -> None:
    restorer, daemon = pair
    restorer.send(encode_task(5))
    restorer.shutdown(socket.SHUT_WR)
    async with asyncio.timeout(5):
        with pytest.raises(RemoteProtocolError, match="before sending the uffd"):
            await receive_record(daemon)


@pytest.mark.asyncio
async def test_slow_sender_is_awaited(pair: tuple[socket.socket, socket.socket]) -> None:
    restorer, daemon = pair
    with Uffd.open() as uffd:
        async def late() -> None:
            word = encode_task(8)
            for piece in (word[:1], word[1:]):
                await asyncio.sleep(0.05)
                restorer.send(piece)
            await asyncio.sleep(0.05)
            restorer.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         struct.pack("i", uffd.fd))])

        async with asyncio.timeout(5), asyncio.TaskGroup() as tg:
            tg.create_task(late())
            record = await receive_record(daemon)
        assert isinstance(record, ReceivedTask)
        assert record.pid == 8
        assert same_file(record.fd, uffd.fd)
        os.close(record.fd)
