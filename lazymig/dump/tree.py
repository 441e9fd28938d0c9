"""Process trees: a process and all its descendants, dumped as ``criu dump -t PID``.

:meth:`FrozenTree.freeze` freezes the root (:class:`~lazymig.dump.freeze.FrozenProcess`),
then lists the children of each frozen process and freezes them in turn,
breadth first. A frozen process forks no more, so the children listed once it
is frozen are all it will ever have until it is released: a child forked while
the tree was being frozen is caught, and the set is stable when every listed
child is frozen. A child that already exited but was not reaped (a zombie) is
recorded, not frozen: CRIU writes only a core image for it, with task state
``TASK_DEAD`` and its exit status (``/proc/PID/stat`` field 52, a wait status).

:func:`dump_tree` writes the tree as CRIU does: one ``pstree.img`` entry per
process (pid, ppid, pgid, sid, threads; parents before their children), and
each live process its own ``core-<tid>``, ``mm-<pid>``, ``pagemap-<pid>``,
``pages-<n>`` (n its rank in the tree) and ``fdinfo-<n>`` images; ``files.img``
holds the open file descriptions of every process (their ids made unique per
process), each once: one that processes share (inherited across a fork, a pipe
end or a log file) under the id of the first that has it, which the ``fdinfo``
of each names (:func:`~lazymig.dump.files.share_files`).
``pipes-data.img`` holds each pipe's contents once, and each shared object
(shared anonymous memory, memfds, deleted tmpfs files) is dumped once, by the
first process that maps it or has it open (:class:`~lazymig.dump.shmem.ShmemDump`).

:func:`start_lazy_tree` does the same for a lazy dump: each process's lazy
pages stay in its own page pipes, a :class:`TreePageStore` serves them by the
pid each GET names, and each process's pipes are filled on its own tracer
thread. :mod:`lazymig.restore.tree` restores such a dump.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import time
from collections.abc import Awaitable, Collection, Iterable, Iterator, Sequence
from typing import Final

from lazymig.dump.files import (
    DumpedFiles,
    collect_files,
    inspect_files,
    share_files,
    write_pipe_data,
    write_sk_queues,
)
from lazymig.dump.freeze import FrozenProcess, inspect_target
from lazymig.dump.images import DumpImages, _inventory, write_images
from lazymig.dump.late_fill import LateFill
from lazymig.dump.scan import MemoryScan, PageRun
from lazymig.dump.shmem import ShmemDump
from lazymig.dump.store import PageSegment, PipePageStore
from lazymig.errors import LazyMigError, LazyMigOSError
from lazymig.linux.procfs import children, descendants, read_stat, read_status
from lazymig.linux.ptrace import TargetGoneError
from lazymig.proto.constants import TASK_DEAD
from lazymig.proto.images import (
    CoreEntry,
    ImageKind,
    ImagesDir,
    PstreeEntry,
    TaskCoreEntry,
    fdinfo_pb2,
)

__all__ = ["TASK_DEAD", "FrozenTree", "LazyTreeDump", "TreePageStore", "Zombie", "dump_tree",
           "has_children", "start_lazy_tree", "zombie_core"]

log = logging.getLogger(__name__)


#: A process's file ids in files.img are its own ids plus rank * this (ranks from 0).
_FILE_ID_STRIDE = 1 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class Zombie:
    """A child that exited and was not reaped yet: only its pstree entry and a core."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    exit_code: int
    """The wait status its parent will get (``/proc/PID/stat`` field 52)."""
    comm: str


class FrozenTree:
    """Every process of a tree held in ptrace-stops (see the module docstring).

    ``processes`` lists the frozen ones, the root first and each parent before
    its children; ``order`` lists every pid of the tree (zombies too) in the
    order of ``pstree.img``; ``ppids`` maps each pid to its parent's (0 for
    the root).
    """

    def __init__(self, root: int, processes: list[FrozenProcess], zombies: list[Zombie],
                 order: list[int], ppids: dict[int, int]) -> None:
        self.root = root
        self.processes = processes
        self.zombies = zombies
        self.order = order
        self.ppids = ppids

    @classmethod
    async def freeze(cls, pid: int, *, stop_timeout: float = 10.0) -> FrozenTree:
        """Freeze ``pid`` and all its descendants; on any error every process
        frozen so far is resumed and the error propagates."""
        frozen: dict[int, FrozenProcess] = {}
        zombies: dict[int, Zombie] = {}
        order = [pid]
        ppids = {pid: 0}
        try:
            frozen[pid] = await FrozenProcess.freeze(pid, stop_timeout=stop_timeout)
            queue = [pid]
            while queue:
                parent = queue.pop(0)
                try:
                    kids = await asyncio.to_thread(children, parent)
                except FileNotFoundError as exc:
                    raise TargetGoneError(parent, f"process {parent} exited") from exc
                for kid in kids:
                    if kid in ppids:
                        continue
                    ppids[kid] = parent
                    order.append(kid)
                    zombie = await asyncio.to_thread(_zombie, kid, parent)
                    if zombie is not None:
                        zombies[kid] = zombie
                        continue
                    try:
                        await asyncio.to_thread(_inspect_child, kid, pid)
                        frozen[kid] = await FrozenProcess.freeze(kid, stop_timeout=stop_timeout)
                    except LazyMigOSError as exc:
                        # It exited between the listing and the seize, or was exiting then
                        # (past the point where PTRACE_SEIZE takes it: EPERM); its frozen
                        # parent cannot have reaped it: a zombie now, or in a moment.
                        if not isinstance(exc, TargetGoneError) and exc.errno != errno.EPERM:
                            raise
                        zombie = await _exited(kid, parent)
                        if zombie is None:
                            raise
                        zombies[kid] = zombie
                        continue
                    queue.append(kid)
        except BaseException:
            for fp in reversed(list(frozen.values())):
                await fp.resume()
            raise
        log.info("tree of %d frozen: %d processes, %d zombies", pid, len(frozen), len(zombies))
        return cls(pid, [frozen[p] for p in order if p in frozen],
                   [zombies[p] for p in order if p in zombies], order, ppids)

    def pstree(self) -> list[PstreeEntry]:
        """One entry per process, in :attr:`order` (the root's ppid is 0, as CRIU)."""
        by_pid = {fp.pid: fp for fp in self.processes}
        zombies = {z.pid: z for z in self.zombies}
        out = []
        for pid in self.order:
            if pid in zombies:
                z = zombies[pid]
                out.append(PstreeEntry(pid=pid, ppid=z.ppid, pgid=z.pgid, sid=z.sid,
                                       threads=[pid]))
            else:
                s = by_pid[pid].state
                out.append(PstreeEntry(pid=pid, ppid=self.ppids[pid], pgid=s.pgid, sid=s.sid,
                                       threads=[t.tid for t in s.threads]))
        return out

    async def release(self, *, kill: bool) -> None:
        """:meth:`FrozenProcess.release` for each process, the children first."""
        errors: list[BaseException] = []
        for fp in reversed(self.processes):
            try:
                await fp.release(kill=kill)
            except LazyMigError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    async def resume(self) -> None:
        """Let every process run on as if nothing happened."""
        await self.release(kill=False)

    async def leave_stopped(self) -> None:
        """:meth:`FrozenProcess.leave_stopped` for each process (an aborted transfer)."""
        for fp in reversed(self.processes):
            await fp.leave_stopped()


class LiveTree(Collection[int]):
    """The processes of ``root``'s tree while it runs: its descendants listed at the
    start, and any process found later whose parents lead to ``root`` (a child forked
    meanwhile: a Pool's worker or a ``spawn`` child made while the checks read /proc,
    holding the tree's pipes; the freeze catches it too). A process gone by the time
    it is asked about counts as in: it holds nothing any more."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.known = {root, *descendants(root)}

    def __contains__(self, pid: object) -> bool:
        if not isinstance(pid, int):
            return False
        chain: list[int] = []
        while pid not in self.known:
            if pid <= 1 or len(chain) > 4096:  # not below root (a loop: pids reused)
                return False
            chain.append(pid)
            try:
                pid = read_stat(pid)[1][4]  # its parent
            except (FileNotFoundError, ProcessLookupError):
                return True
        self.known.update(chain)
        return True

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.known))

    def __len__(self) -> int:
        return len(self.known)


def has_children(pid: int) -> bool:
    """True if ``pid`` has child processes (its dump is then a tree's)."""
    try:
        return bool(children(pid))
    except FileNotFoundError as exc:
        raise TargetGoneError(pid, f"process {pid} does not exist") from exc


def _inspect_child(pid: int, root: int) -> None:
    """Refuse ``pid`` of the tree of ``root`` from /proc (a pipe it shares with
    another process of the tree is fine, one forked meanwhile too)."""
    inspect_target(pid)
    inspect_files(pid, LiveTree(root))


def _zombie(pid: int, ppid: int) -> Zombie | None:
    """``pid`` as a :class:`Zombie` if it is one, else None (gone too: its parent
    is frozen and cannot have reaped it, so None then means alive)."""
    try:
        state, fields = read_stat(pid)
        name = read_status(pid).get("Name", "")
    except (FileNotFoundError, ProcessLookupError):
        return None
    if state not in ("Z", "X"):
        return None
    return Zombie(pid=pid, ppid=ppid, pgid=fields[5], sid=fields[6],
                  exit_code=fields.get(52, 0), comm=name)


_EXIT_WAIT: Final = 2.0
"""Seconds a process found exiting may take to be a zombie."""


async def _exited(pid: int, ppid: int) -> Zombie | None:
    """``pid``, which was found exiting, once it is a zombie (None if it is not one
    within :data:`_EXIT_WAIT`: it was alive after all)."""
    deadline = time.monotonic() + _EXIT_WAIT
    while (zombie := await asyncio.to_thread(_zombie, pid, ppid)) is None:
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.001)
    return zombie


def zombie_core(z: Zombie) -> CoreEntry:
    """CRIU's core image of a zombie: its task state and exit status, nothing else."""
    return CoreEntry(mtype=CoreEntry.X86_64, tc=TaskCoreEntry(
        task_state=TASK_DEAD, exit_code=z.exit_code, personality=0, flags=0, blk_sigset=0,
        comm=z.comm))


def _renumbered(files: DumpedFiles, rank: int) -> DumpedFiles:
    """``files`` with ids unique in the tree's ``files.img``."""
    shift = rank * _FILE_ID_STRIDE
    out = DumpedFiles(pipe_data=list(files.pipe_data), fifo_data=list(files.fifo_data),
                      memfds=dict(files.memfds), locks=list(files.locks),
                      external={i + shift: name for i, name in files.external.items()},
                      origins={i + shift: o for i, o in files.origins.items()})
    for packet, data in files.sk_queues:
        out.sk_queues.append((type(packet)(id_for=packet.id_for + shift, length=packet.length),
                              data))
    for e in files.fds:
        e2 = type(e)()
        e2.CopyFrom(e)
        e2.id = e.id + shift
        out.fds.append(e2)
    for f in files.files:
        f2 = type(f)()
        f2.CopyFrom(f)
        f2.id = f.id + shift
        for sub in ("reg", "pipe", "fifo", "efd", "epfd", "tfd", "sgfd", "usk"):
            if f2.HasField(sub) and hasattr(getattr(f2, sub), "id"):
                getattr(f2, sub).id = getattr(f, sub).id + shift
        if f2.HasField("fifo"):
            f2.fifo.regf_id += shift
        for t in f2.epfd.tfd:
            t.id += shift
        out.files.append(f2)
    return out


def _write_tree_images(images: ImagesDir, tree: FrozenTree, files: Sequence[DumpedFiles],
                       shmem: ShmemDump, written: DumpImages) -> None:
    """What the tree has once: zombies' cores, files.img, pipes-data.img,
    memfd-inode.img, pstree.img, and the inventory last (its presence marks a
    complete dump)."""
    written.paths += shmem.write_inodes(images)
    for z in tree.zombies:
        written.paths.append(images.write_core(z.pid, zombie_core(z)))
    merged = [f for per in files for f in per.files]
    written.paths.append(images.write_entries(ImageKind.FILES, merged))
    written.paths.append(write_pipe_data(images, ImageKind.PIPES_DATA,
                                         [q for per in files for q in per.pipe_data]))
    if any(f.type == fdinfo_pb2.FIFO for f in merged):
        written.paths.append(write_pipe_data(images, ImageKind.FIFO_DATA,
                                             [q for per in files for q in per.fifo_data]))
    if locks := [lock for per in files for lock in per.locks]:
        written.paths.append(images.write_entries(ImageKind.FILE_LOCKS, locks))
    if queues := [q for per in files for q in per.sk_queues]:
        written.paths.append(write_sk_queues(images, queues))
    written.paths.append(images.write_pstree(tree.pstree()))
    written.paths.append(images.write_inventory(_inventory()))


async def _files_and_scan(tree: FrozenTree, rank: int, files: list[DumpedFiles]
                          ) -> MemoryScan:
    """The open files of the process of ``rank`` in the tree, added to ``files``
    (renumbered for its rank; a description it shares with a process before it
    is that process's, :func:`~lazymig.dump.files.share_files`), and its memory scan."""
    fp = tree.processes[rank]
    own = _renumbered(await asyncio.to_thread(collect_files, fp.pid, tree.order), rank)
    own = await asyncio.to_thread(share_files, fp.pid, own,
                                  [(p.pid, f) for p, f in zip(tree.processes[:rank], files,
                                                              strict=True)])
    files.append(own)
    return await fp.scan()


async def dump_tree(pid: int, images: ImagesDir, *, leave_running: bool = False,
                    pipe_size: int | None = None) -> tuple[DumpImages, float]:
    """A plain dump of ``pid`` and its descendants: every page of each process in
    its ``pages-<n>.img``. Then the tree is killed, or resumed with
    ``leave_running``; on failure it is resumed unchanged and the images
    written are removed. Returns the images and the seconds it was frozen."""
    await asyncio.to_thread(_inspect_child, pid, pid)
    started = time.monotonic()
    tree = await FrozenTree.freeze(pid)
    total = DumpImages(images)
    shmem = ShmemDump()
    try:
        files: list[DumpedFiles] = []
        for rank, fp in enumerate(tree.processes):
            scan = await _files_and_scan(tree, rank, files)
            plain = MemoryScan(scan.pid, scan.vmas,
                               tuple(PageRun(r.vaddr, r.nr_pages, False) for r in scan.runs))
            pipes = await fp.collect_pages(plain, pipe_size=pipe_size)
            try:
                state = fp.state
                one = await asyncio.to_thread(
                    write_images, images, state, scan, pipes, lazy_pages=False,
                    open_files=files[rank], index=rank + 1, in_tree=True, shmem=shmem)
            finally:
                pipes.close()
            total.add(one)
        await asyncio.to_thread(_write_tree_images, images, tree, files, shmem, total)
    except BaseException:
        total.remove()
        await tree.resume()
        raise
    frozen = time.monotonic() - started
    await tree.release(kill=not leave_running)
    log.info("tree of %d dumped into %s in %.3f s: %d processes, %d zombies, %d pages; %s",
             pid, images.path, frozen, len(tree.processes), len(tree.zombies),
             total.nonlazy_pages, "left running" if leave_running else "killed")
    return total, frozen


class TreePageStore:
    """The lazy pages of every process of a tree: a
    :class:`~lazymig.dump.store.PipePageStore` per image pid (a GET names its pid)."""

    def __init__(self, stores: dict[int, PipePageStore]) -> None:
        self._stores = stores

    def pids(self) -> Iterable[int]:
        return tuple(self._stores)

    def lazy_ranges(self, pid: int) -> list[tuple[int, int]]:
        store = self._stores.get(pid)
        return store.lazy_ranges(pid) if store is not None else []

    def lookup(self, pid: int, vaddr: int, nr_pages: int
               ) -> PageSegment | Awaitable[PageSegment] | None:
        store = self._stores.get(pid)
        return store.lookup(pid, vaddr, nr_pages) if store is not None else None

    def close(self) -> None:
        for store in self._stores.values():
            store.close()


@dataclasses.dataclass(slots=True)
class LazyTreeDump:
    """A tree frozen, its images written (lazy pages only listed), its lazy pages in
    a :class:`TreePageStore` (what :class:`~lazymig.dump.dumper.LazyDump` serves)."""

    tree: FrozenTree
    written: DumpImages
    store: TreePageStore
    fills: list[tuple[LateFill, FrozenProcess]]

    async def fill(self) -> None:
        """Fill every process's lazy page pipes (each on its own tracer thread)."""
        async with asyncio.TaskGroup() as tg:
            for late_fill, fp in self.fills:
                tg.create_task(late_fill.run(fp))


async def start_lazy_tree(pid: int, images: ImagesDir, *,
                          pipe_size: int | None = None) -> LazyTreeDump:
    """Freeze the tree of ``pid`` and write its images for a lazy dump; on failure
    the tree is resumed and the images are removed."""
    await asyncio.to_thread(_inspect_child, pid, pid)
    tree = await FrozenTree.freeze(pid)
    total = DumpImages(images)
    shmem = ShmemDump()
    stores: dict[int, PipePageStore] = {}
    fills: list[tuple[LateFill, FrozenProcess]] = []
    try:
        files: list[DumpedFiles] = []
        for rank, fp in enumerate(tree.processes):
            scan = await _files_and_scan(tree, rank, files)
            pipes = await fp.collect_pages(scan, pipe_size=pipe_size, defer_lazy=True)
            late_fill = LateFill(pipes)
            stores[fp.pid] = PipePageStore(fp.pid, pipes, late_fill)
            fills.append((late_fill, fp))
            state = fp.state
            one = await asyncio.to_thread(
                write_images, images, state, scan, pipes, lazy_pages=True,
                open_files=files[rank], index=rank + 1, in_tree=True, shmem=shmem)
            total.add(one)
        await asyncio.to_thread(_write_tree_images, images, tree, files, shmem, total)
    except BaseException:
        for store in stores.values():
            store.close()
        total.remove()
        await tree.resume()
        raise
    return LazyTreeDump(tree, total, TreePageStore(stores), fills)
