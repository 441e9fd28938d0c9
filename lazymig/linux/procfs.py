"""Reading /proc: every /proc file whose layout lazymig reads (stat, status, comm,
auxv, maps, smaps, fdinfo, limits, mountinfo, the exe/cwd/root and fd links,
sysctls), the pagemap it opens, and the paths into /proc it opens or hands to a
process to open (fd, map_files, ns). Outside ``linux/``, nothing spells a /proc path.

``/proc/PID/mem`` is the exception: it is memory access, in :mod:`lazymig.linux.vm`.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Literal

ProcLink = Literal["exe", "cwd", "root"]
"""The /proc/PID links lazymig reads: the executable, the working and the root directory."""

ProcNumber = Literal["personality", "loginuid", "oom_score_adj"]
"""The /proc/PID files lazymig reads that hold one number."""

ProcSelf = Literal["self"]
"""``/proc/self``: this process, for a path opened inside another one (an injected
``open`` resolves it to that process)."""

__all__ = [
    "ProcLink",
    "ProcNumber",
    "ProcSelf",
    "blocked_syscalls",
    "children",
    "descendants",
    "fd_links",
    "fd_path",
    "fds",
    "link_path",
    "lowest_mappable",
    "map_file_path",
    "mount_point",
    "ns_inode",
    "ns_path",
    "ns_pids",
    "open_files_limit",
    "open_pagemap",
    "pid_in_use",
    "pidfd_pid",
    "processes",
    "read_auxv",
    "read_comm",
    "read_fdinfo",
    "read_int",
    "read_link",
    "read_maps",
    "read_smaps",
    "read_stat",
    "read_status",
    "read_syscall",
    "registered_with_userfaultfd",
    "root_path",
    "sysctl_int",
    "threads",
    "tmpfs_devices",
    "uptime",
    "userfaultfd_vmas",
]


def read_maps(pid: int) -> str:
    """The text of ``/proc/PID/maps`` (no page-table walk, unlike smaps).

    Raises:
        FileNotFoundError, ProcessLookupError: the process is gone.
    """
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def read_smaps(pid: int) -> str:
    """The text of ``/proc/PID/smaps`` (walks the page tables: slow for a large process).

    Raises:
        FileNotFoundError, ProcessLookupError: the process is gone.
    """
    with open(f"/proc/{pid}/smaps") as f:
        return f.read()


def read_stat(pid: int, tid: int | None = None) -> tuple[str, dict[int, int]]:
    """The state letter and the numeric fields of ``/proc/PID/stat`` (of thread
    ``tid``'s own stat if given).

    Fields are keyed by their proc(5) number, from 4 (ppid) on; the command
    name (field 2, which may hold spaces and parentheses) is skipped.

    Raises:
        FileNotFoundError: the process (or thread) is gone.
    """
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path, "rb") as f:
        raw = f.read()
    rest = raw[raw.rfind(b")") + 2:].split()
    return rest[0].decode(), {i + 3: int(v) for i, v in enumerate(rest) if i > 0}


def read_fdinfo(pid: int, fd: int) -> list[tuple[str, str]]:
    """The lines of ``/proc/PID/fdinfo/FD`` as (key, value stripped), in order (an
    epoll's ``tfd`` lines repeat their key).

    Raises:
        FileNotFoundError: the process is gone or the fd closed.
    """
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return [(key.strip(), value.strip()) for key, _, value in
                (line.partition(":") for line in f)]


def read_status(pid: int, tid: int | None = None) -> dict[str, str]:
    """The fields of ``/proc/PID/status`` (of thread ``tid``'s own status if given),
    values stripped.

    Raises:
        FileNotFoundError, ProcessLookupError: the process (or thread) is gone.
    """
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    with open(path) as f:
        text = f.read()
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def read_comm(pid: int, tid: int | None = None) -> str:
    """The command name of ``/proc/PID/comm`` (of thread ``tid``'s own if given).

    Raises:
        FileNotFoundError, ProcessLookupError: the process (or thread) is gone.
    """
    path = f"/proc/{pid}/comm" if tid is None else f"/proc/{pid}/task/{tid}/comm"
    with open(path) as f:
        return f.read().rstrip("\n")


def read_int(pid: int, name: ProcNumber, base: int = 10) -> int:
    """The one number of the file ``/proc/PID/NAME`` (``personality`` is in hex: base 16).

    Raises:
        OSError: the process is gone, or the file is not there (no audit: loginuid);
        ValueError: it holds no number.
    """
    with open(f"/proc/{pid}/{name}") as f:
        return int(f.read().rstrip("\n"), base)


def read_link(pid: int, name: ProcLink) -> str:
    """What the link ``/proc/PID/NAME`` reads (``exe``: the executable's path).

    Raises:
        OSError: the process is gone (FileNotFoundError), or not ours to look at.
    """
    return str(Path(link_path(pid, name)).readlink())


def link_path(pid: int, name: ProcLink) -> str:
    """``/proc/PID/NAME``: to stat what the link names (the file itself, a deleted one too)."""
    return f"/proc/{pid}/{name}"


def read_auxv(pid: int) -> tuple[int, ...]:
    """The auxiliary vector of ``/proc/PID/auxv``: its flat (type, value) words up to and
    with AT_NULL (x86-64: 8 bytes a word).

    Raises:
        FileNotFoundError: the process is gone.
    """
    with open(f"/proc/{pid}/auxv", "rb") as f:
        raw = f.read()
    words = [w for (w,) in struct.iter_unpack("<Q", raw[: len(raw) & ~7])]
    out: list[int] = []
    for i in range(0, len(words) - 1, 2):
        out += words[i: i + 2]
        if words[i] == 0:  # AT_NULL
            break
    return tuple(out)


def uptime() -> float:
    """Seconds since boot (``/proc/uptime``, the first number)."""
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def open_pagemap(pid: int | ProcSelf) -> int:
    """A new fd (O_CLOEXEC, the caller's to close) on ``/proc/PID/pagemap``: 8 bytes a
    page, read with ``pread`` at (address / page size) * 8.

    Raises:
        FileNotFoundError, ProcessLookupError: the process is gone.
    """
    return os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)


def registered_with_userfaultfd(pid: int, address: int) -> bool:
    """True if the mapping of ``pid`` (a process or thread) holding ``address`` is
    registered with a userfaultfd for missing pages (``um`` in its smaps VmFlags).

    Tells the threads of a lazily restored process from a process that merely read
    its memory (process_vm_readv, /proc/PID/mem): both fault on its pages, only
    the former has the lazy mapping itself. False if ``pid`` is gone.
    """
    try:
        with open(f"/proc/{pid}/smaps", "rb") as f:
            inside = False
            for line in f:
                key = line.split(None, 1)[0]
                if not key.endswith(b":"):  # a mapping's header: START-END perms ...
                    start, end = (int(x, 16) for x in key.split(b"-"))
                    inside = start <= address < end
                elif inside and key == b"VmFlags:":
                    return b" um" in line
    except (FileNotFoundError, ProcessLookupError):
        pass
    return False


def userfaultfd_vmas(pid: int, modes: tuple[bytes, ...] = (b"um",)) -> list[tuple[int, int]]:
    """The ``(start, end)`` of every mapping of ``pid`` registered with a userfaultfd
    in one of ``modes`` (smaps VmFlags: ``um`` missing pages, ``uw`` write-protect,
    ``ui`` minor faults), in address order.

    Raises:
        FileNotFoundError, ProcessLookupError: the process is gone.
    """
    found: list[tuple[int, int]] = []
    with open(f"/proc/{pid}/smaps", "rb") as f:
        span = (0, 0)
        for line in f:
            key = line.split(None, 1)[0]
            if not key.endswith(b":"):  # a mapping's header: START-END perms ...
                start, end = (int(x, 16) for x in key.split(b"-"))
                span = (start, end)
            elif key == b"VmFlags:" and any(m in line.split() for m in modes):
                found.append(span)
    return found


def ns_pids(pid: int) -> tuple[int, ...]:
    """The pids of process ``pid`` in each pid namespace it is in, outermost first
    (``NSpid`` of its status; the last is the pid it sees itself, as CRIU's images do).

    Raises:
        FileNotFoundError, ProcessLookupError: the process is gone.
    """
    return tuple(int(x) for x in read_status(pid).get("NSpid", str(pid)).split())


def tmpfs_devices(pid: int) -> frozenset[tuple[int, int]]:
    """(major, minor) of every tmpfs mounted in the mount namespace of ``pid``
    (``/proc/PID/mountinfo``): files there are shared memory, like memfds.

    Raises:
        FileNotFoundError, ProcessLookupError: the process is gone.
    """
    found = set()
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype == "tmpfs":
                major, minor = fields[2].split(":")
                found.add((int(major), int(minor)))
    return frozenset(found)


def mount_point(pid: int, dev: tuple[int, int]) -> str | None:
    """Where the filesystem of device ``dev`` (major, minor) is mounted in the
    mount namespace of ``pid``, its root mount first (``/proc/PID/mountinfo``);
    None if it is not.

    Raises:
        FileNotFoundError, ProcessLookupError: the process is gone.
    """
    found = None
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == f"{dev[0]}:{dev[1]}":
                if fields[3] == "/":
                    return fields[4]
                found = found or fields[4]
    return found


def pid_in_use(pid: int) -> bool:
    """True if a process or thread has ``pid`` here, a zombie too (the /proc entry a
    thread has beside its process's, unlisted but there)."""
    return Path(f"/proc/{pid}").exists()


def threads(pid: int) -> list[int]:
    """The tids of process ``pid``'s threads, in /proc's order; empty if it is gone."""
    try:
        return [int(entry.name) for entry in os.scandir(f"/proc/{pid}/task")]
    except (FileNotFoundError, ProcessLookupError):
        return []


def processes() -> list[int]:
    """The pids of every process (thread-group leaders) in /proc."""
    return [int(entry.name) for entry in os.scandir("/proc") if entry.name.isdigit()]


def children(pid: int) -> list[int]:
    """The live children of process ``pid`` (of any of its threads), from the kernel's
    ``/proc/PID/task/TID/children`` lists; empty if it is gone."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return found
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):  # that thread exited
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, parents before their children (a walk of
    the kernel's children lists: only the tree's own /proc entries are read)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children(todo.pop(0)):
            found.append(child)
            todo.append(child)
    return found


def pidfd_pid(pidfd: int) -> int:
    """The pid of the process behind this process's ``pidfd`` (its fdinfo's ``Pid:``)."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Pid:")))


def lowest_mappable() -> int:
    """The lowest page address mmap allows (``vm.mmap_min_addr``, at least one page in):
    no process maps it in practice, so a probe there touches nothing."""
    lowest = sysctl_int("vm.mmap_min_addr")
    return max(4096, (lowest + 4095) & ~4095)


def blocked_syscalls(pid: int) -> dict[int, tuple[int, list[int]]]:
    """Thread id -> (the system call it is blocked in, its six arguments), from
    ``/proc/PID/task/TID/syscall``, for every thread of ``pid`` blocked in one (a
    running thread, the caller among them, is left out)."""
    try:
        tids = [int(entry.name) for entry in os.scandir(f"/proc/{pid}/task")]
    except (FileNotFoundError, ProcessLookupError):
        return {}
    out = {}
    for tid in tids:
        call = read_syscall(pid, tid)
        if call is not None:
            out[tid] = call
    return out


def read_syscall(pid: int, tid: int) -> tuple[int, list[int]] | None:
    """The system call thread ``tid`` of ``pid`` is blocked in, and its arguments, from
    ``/proc/PID/task/TID/syscall``; None if it runs (or is gone, not in a call, or
    not this process's to read: that needs ptrace access)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            fields = f.read().split()
    except (FileNotFoundError, ProcessLookupError, PermissionError):  # gone, or not ours
        return None
    if not fields or not fields[0].lstrip("-").isdigit() or int(fields[0]) < 0:
        return None  # "running", or -1: blocked outside a system call
    return int(fields[0]), [int(a, 16) for a in fields[1:7]]


def sysctl_int(name: str) -> int:
    """The integer value of sysctl ``name`` (dotted, as ``sysctl`` spells it:
    ``fs.pipe-max-size`` is ``/proc/sys/fs/pipe-max-size``)."""
    with open("/proc/sys/" + name.replace(".", "/"), "rb") as f:
        return int(f.read())


def fd_path(pid: int | ProcSelf, fd: int) -> str:
    """``/proc/PID/fd/FD``: fd ``fd`` of process ``pid``, to open or stat from outside
    (``self``: to open in the process that opens it)."""
    return f"/proc/{pid}/fd/{fd}"


def root_path(pid: int, path: str) -> str:
    """``/proc/PID/root/PATH``: absolute ``path`` as process ``pid`` sees it (its root
    and mount namespace), to open from outside."""
    return f"/proc/{pid}/root{path}"


def map_file_path(pid: int | ProcSelf, start: int, end: int) -> str:
    """``/proc/PID/map_files/START-END``: the file mapped at [start, end) of ``pid``,
    to open or stat from outside (needs CAP_SYS_ADMIN or ptrace rights; ``self``: in
    the process that opens it)."""
    return f"/proc/{pid}/map_files/{start:x}-{end:x}"


def fds(pid: int) -> list[int]:
    """The fd numbers process ``pid`` has open, in /proc's order (a listing of this
    process's own shows the directory fd the listing opens too).

    Raises:
        FileNotFoundError, ProcessLookupError: the process is gone.
    """
    return [int(entry.name) for entry in os.scandir(f"/proc/{pid}/fd")]


def fd_links(pid: int) -> list[tuple[int, str]]:
    """(fd, what its /proc link reads) of every fd of process ``pid``; an fd closed
    while it is listed is left out. Cheap enough to run over every process of a
    loaded host (os.readlink, no Path made).

    Raises:
        OSError: the process is gone, or not ours to look at.
    """
    out = []
    for entry in os.scandir(f"/proc/{pid}/fd"):
        try:
            out.append((int(entry.name), os.readlink(entry.path)))  # noqa: PTH115 - no Path made
        except OSError:  # closed meanwhile
            continue
    return out


def open_files_limit(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of process ``pid`` (``/proc/PID/limits``), None if
    unlimited.

    Raises:
        FileNotFoundError, ProcessLookupError: the process is gone.
    """
    with open(f"/proc/{pid}/limits") as f:
        line = next((ln for ln in f if ln.startswith("Max open files")), None)
    if line is None:
        raise FileNotFoundError(f"/proc/{pid}/limits has no 'Max open files' line")
    soft = line.split()[3]
    return None if soft == "unlimited" else int(soft)


def ns_inode(pid: int, kind: str) -> int:
    """The inode of process ``pid``'s namespace ``kind`` (``net``, ``pid``, ...):
    two processes share that namespace if it is the same.

    Raises:
        FileNotFoundError, ProcessLookupError: the process is gone.
    """
    return Path(ns_path(pid, kind)).stat().st_ino


def ns_path(pid: int, kind: str) -> str:
    """``/proc/PID/ns/KIND``: process ``pid``'s namespace ``kind``, to open for setns."""
    return f"/proc/{pid}/ns/{kind}"
