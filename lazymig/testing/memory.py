"""Asserting that a migrated process's memory is the source's, page by page.

The restored process's memory is read with ``process_vm_readv``
(:func:`lazymig.linux.vm.process_vm_readv`) and compared with what the source
held: the known pattern of a :mod:`~lazymig.testing.workload` (:class:`Pattern`)
or a :class:`MemorySnapshot` read from the source before it was killed. A
failure names the first page that differs::

    from lazymig.testing.memory import MemorySnapshot, Pattern, assert_memory_equal

    expected = Pattern.of(workload.ready)          # or, for any process:
    expected = MemorySnapshot.take(source_pid, [(address, length)])
    ...                                            # migrate; the source is gone
    await assert_memory_equal(restored_pid, expected)

Compare once the transfer is done (the daemon has exited, or its handle's
``done`` resolved): reading a lazy page that has not arrived yet is a page
fault the daemon must serve, taken by the reading thread of this process.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import errno
import functools
import sys
from collections.abc import Iterable, Iterator
from typing import Protocol

from lazymig.errors import ConfigurationError, LazyMigOSError
from lazymig.linux.vm import buffer_address, process_vm_readv
from lazymig.testing.workload import PAGE, Ready, pattern_bytes

__all__ = [
    "ExpectedMemory",
    "MemoryDifference",
    "MemorySnapshot",
    "Pattern",
    "assert_memory_equal",
    "compare_memory",
    "read_process_memory",
]

_CHUNK = 1 << 20  # bytes compared at a time (aligned): bounds what is held twice in memory
_WORD_MASK = (1 << 64) - 1
_SHOWN = 16  # bytes of each side quoted in a failure message


class ExpectedMemory(Protocol):
    """What a process's memory should hold: regions, and their content on demand."""

    @property
    def regions(self) -> list[tuple[int, int]]:
        """``(address, length)`` of each region to compare, page-aligned."""
        ...

    def content(self, address: int, length: int) -> bytes:
        """The ``length`` bytes expected at ``address`` (inside one region)."""
        ...


@dataclasses.dataclass(frozen=True)
class Pattern:
    """The pattern a workload keeps: the word at address ``a`` is ``a ^ seed``."""

    regions: list[tuple[int, int]]
    seed: int

    @classmethod
    def of(cls, ready: Ready) -> Pattern:
        """The pattern of the workload that printed ``ready`` (every pattern region)."""
        return cls(ready.regions, ready.seed)

    def content(self, address: int, length: int) -> bytes:
        """The pattern's bytes at ``address``."""
        out = bytearray()
        end = address + length
        while address < end:
            base = address & ~(_CHUNK - 1)
            stop = min(end, base + _CHUNK)
            out += self._block(base)[address - base:stop - base]
            address = stop
        return bytes(out)

    def _block(self, base: int) -> bytes:
        """The aligned ``_CHUNK`` bytes at ``base``.

        Inside an aligned block an address is ``base | offset`` with disjoint
        bits, so each word is ``(base ^ seed)``'s high bits plus a low part the
        same in every block: one multiply-add over big integers, not a loop.
        """
        high = (base ^ self.seed) & ~(_CHUNK - 1) & _WORD_MASK
        words = self._low_words + high * self._ones
        return words.to_bytes(_CHUNK, sys.byteorder)

    @functools.cached_property
    def _low_words(self) -> int:
        """Every word of a block whose address bits above the block are zero."""
        low = pattern_bytes(0, _CHUNK, self.seed & (_CHUNK - 1))
        return int.from_bytes(low, sys.byteorder)

    @functools.cached_property
    def _ones(self) -> int:
        """The integer whose every 8-byte word is 1."""
        return int.from_bytes((1).to_bytes(8, sys.byteorder) * (_CHUNK // 8), sys.byteorder)


@dataclasses.dataclass(frozen=True)
class MemorySnapshot:
    """Bytes read from a process's memory, by region; see :meth:`take`."""

    pid: int
    data: dict[int, bytes]
    """Region start address -> its bytes."""

    @classmethod
    def take(cls, pid: int, regions: Iterable[tuple[int, int]]) -> MemorySnapshot:
        """Read ``(address, length)`` regions of process ``pid`` now.

        Take it while the source still runs or is frozen (inside
        ``lazymig.serve``, before a complete transfer kills it). Blocking:
        wrap it in ``asyncio.to_thread`` for large regions in async code.

        Raises:
            AssertionError: a page could not be read (unmapped, no ``PROT_READ``)
                or the process is gone.
        """
        return cls(pid, {address: read_process_memory(pid, address, length)
                         for address, length in regions})

    @property
    def regions(self) -> list[tuple[int, int]]:
        """``(address, length)`` of each region read."""
        return [(address, len(data)) for address, data in self.data.items()]

    def content(self, address: int, length: int) -> bytes:
        """The bytes the snapshot holds at ``address``."""
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0:
            start = self._starts[i]
            data = self.data[start]
            if address + length <= start + len(data):
                return data[address - start:address - start + length]
        raise KeyError(f"{address:#x}+{length} is outside the snapshot's regions")

    @functools.cached_property
    def _starts(self) -> list[int]:
        """The regions' starts, sorted (a snapshot may hold thousands of regions)."""
        return sorted(self.data)


@dataclasses.dataclass(frozen=True)
class MemoryDifference:
    """Where a process's memory first differs from what was expected."""

    pid: int
    page: int
    """Address of the first page that differs."""
    offset: int
    """Offset in that page of the first byte that differs."""
    expected: bytes
    actual: bytes
    """Up to 16 bytes from ``offset`` on; empty if the page could not be read."""
    pages: int
    """Pages that differ (or could not be read) in all."""
    compared: int
    """Pages compared in all."""
    against: str = "what was expected"
    """What the memory was compared with (the pattern, a snapshot of the source)."""

    def __str__(self) -> str:
        if not self.actual:
            first = f"page {self.page:#x} could not be read"
        else:
            first = (f"first differing page {self.page:#x}, at offset {self.offset:#x}: "
                     f"expected {self.expected.hex(' ')}, got {self.actual.hex(' ')}")
        return (f"memory of pid {self.pid} differs from {self.against} in {self.pages} of "
                f"{self.compared} pages; {first}")


def read_process_memory(pid: int, address: int, length: int) -> bytes:
    """``length`` bytes of process ``pid`` at ``address``, with ``process_vm_readv``.

    Raises:
        AssertionError: the process is gone, or a page could not be read (the
            message names it).
    """
    buffer = bytearray(length)
    done = _read_into(pid, buffer, address, length)
    if done < length:
        raise AssertionError(f"page {(address + done) & ~(PAGE - 1):#x} of pid {pid} "
                             "cannot be read (unmapped or not readable)")
    return bytes(buffer)


def _read_into(pid: int, buffer: bytearray, address: int, length: int) -> int:
    """Bytes read into ``buffer`` (short at the first unreadable page)."""
    base = buffer_address(buffer)
    done = 0
    while done < length:
        try:
            n = process_vm_readv(pid, base + done, address + done,
                                 length - done)
        except LazyMigOSError as exc:
            if exc.errno == errno.EFAULT:
                break  # the page at address + done cannot be read
            raise AssertionError(f"cannot read the memory of pid {pid}: {exc}") from exc
        if n == 0:
            break
        done += n
    return done


def _chunks(regions: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    for start, length in regions:
        if start % PAGE or length % PAGE:
            raise ConfigurationError(f"region {start:#x}+{length} is not page-aligned")
        at, end = start, start + length
        while at < end:
            stop = min(end, (at & ~(_CHUNK - 1)) + _CHUNK)  # within one aligned chunk
            yield at, stop - at
            at = stop


def compare_memory(pid: int, expected: ExpectedMemory) -> MemoryDifference | None:
    """Compare process ``pid``'s memory with ``expected``, page by page.

    Returns None if every page of every expected region is equal, else where
    the first difference is and how many pages differ. Blocking (see
    :func:`assert_memory_equal` for async code).
    """
    first: MemoryDifference | None = None
    differing = compared = 0
    buffer = bytearray(_CHUNK)
    for start, length in _chunks(expected.regions):
        readable = _read_into(pid, buffer, start, length)
        want = expected.content(start, length)
        got = memoryview(buffer).cast("B")[:length]
        compared += length // PAGE
        if readable == length and got == want:
            continue
        for offset in range(0, length, PAGE):
            page_want = want[offset:offset + PAGE]
            if offset >= readable:
                page_got = b""
            elif (page_got := bytes(got[offset:offset + PAGE])) == page_want:
                continue
            differing += 1
            if first is None:
                at = next((i for i, (a, b) in enumerate(zip(page_got, page_want, strict=False))
                           if a != b), 0)
                first = MemoryDifference(pid, start + offset, at, page_want[at:at + _SHOWN],
                                         page_got[at:at + _SHOWN], 0, 0)
    if first is None:
        return None
    return dataclasses.replace(first, pages=differing, compared=compared,
                               against=_described(expected))


def _described(expected: ExpectedMemory) -> str:
    """What a failure message calls ``expected``."""
    if isinstance(expected, Pattern):
        return f"the workload's pattern (seed {expected.seed:#x})"
    if isinstance(expected, MemorySnapshot):
        return f"the snapshot of pid {expected.pid}"
    return "what was expected"


async def assert_memory_equal(pid: int, expected: ExpectedMemory) -> None:
    """Fail unless process ``pid``'s memory equals ``expected`` page by page.

    The comparison runs in a thread (it reads and compares every page). Example::

        await assert_memory_equal(restored.pid, Pattern.of(workload.ready))

    Raises:
        AssertionError: naming the first differing page, what was expected
            there and what was found, and how many pages differ.
    """
    difference = await asyncio.to_thread(compare_memory, pid, expected)
    if difference is not None:
        raise AssertionError(str(difference))
