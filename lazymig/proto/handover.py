"""The restore-to-daemon handover, as ``criu restore --lazy-pages`` speaks it.

Over a UNIX stream socket, for each restored task:

1. a native int32: the task's pid as the images name it (virtual pid);
2. for a zombie that pid is negated and nothing follows; otherwise one
   ``sendmsg`` of a single data byte (0) carrying the task's userfaultfd as
   SCM_RIGHTS.

After the last task, the u32 :data:`RESTORE_FINISHED` marker (0x52535446, the
bytes ``46 54 53 52``). The fd byte must be read with ``recvmsg`` and ancillary
space: a plain stream read that reaches it discards the fd (MSG_CTRUNC).
This module only encodes and decodes; the asyncio I/O is in
:mod:`lazymig.uffd.handover`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, TypeAlias

from lazymig.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "FD_CARRIER",
    "PID_MAX_LIMIT",
    "RESTORE_FINISHED",
    "WORD_SIZE",
    "HandoverRecord",
    "RestoreFinished",
    "TaskHandover",
    "ZombieTask",
    "decode_word",
    "encode_restore_finished",
    "encode_task",
    "encode_zombie",
]

RESTORE_FINISHED: Final = 0x52535446
"""CRIU's "ReSTore Finished" marker."""
PID_MAX_LIMIT: Final = 4 * 1024 * 1024
"""The kernel's upper bound on pid_max (PID_MAX_LIMIT on 64-bit)."""
WORD_SIZE: Final = 4
FD_CARRIER: Final = b"\0"
"""The single data byte that carries the uffd in its SCM_RIGHTS."""

_INT32 = struct.Struct("=i")
_UINT32 = struct.Struct("=I")


@dataclass(frozen=True, slots=True)
class TaskHandover:
    """A live task: its uffd follows as SCM_RIGHTS on a 1-byte message."""

    pid: int


@dataclass(frozen=True, slots=True)
class ZombieTask:
    """A zombie task: it has no memory, so no uffd follows."""

    pid: int


@dataclass(frozen=True, slots=True)
class RestoreFinished:
    """The restorer has handed over every task."""


HandoverRecord: TypeAlias = TaskHandover | ZombieTask | RestoreFinished


def _check_pid(pid: int) -> None:
    if not 0 < pid <= PID_MAX_LIMIT:
        raise LocalProtocolError(f"pid {pid} is outside 1..{PID_MAX_LIMIT}", field="pid")


def encode_task(pid: int) -> bytes:
    """The 4-byte word announcing a live task (its fd goes in the next message)."""
    _check_pid(pid)
    return _INT32.pack(pid)


def encode_zombie(pid: int) -> bytes:
    """The 4-byte word for a zombie task (the negated pid)."""
    _check_pid(pid)
    return _INT32.pack(-pid)


def encode_restore_finished() -> bytes:
    """The 4-byte "restore finished" marker."""
    return _UINT32.pack(RESTORE_FINISHED)


def decode_word(word: bytes | bytearray | memoryview) -> HandoverRecord:
    """Decode one 4-byte word of the handover stream."""
    if len(word) != WORD_SIZE:
        raise RemoteProtocolError(f"handover word of {len(word)} bytes, not 4", field="pid")
    if _UINT32.unpack(word)[0] == RESTORE_FINISHED:
        return RestoreFinished()
    (pid,) = _INT32.unpack(word)
    if 0 < pid <= PID_MAX_LIMIT:
        return TaskHandover(pid)
    if -PID_MAX_LIMIT <= pid < 0:
        return ZombieTask(-pid)
    raise RemoteProtocolError(f"handover word {pid} is neither a pid nor the end marker",
                              field="pid")
