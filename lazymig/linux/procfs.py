"""Reading /proc: every /proc file whose layout lazymig reads (stat, status, smaps,
limits, the fd and map_files links, sysctls) and the paths into /proc it opens.

``/proc/PID/mem`` is the exception: it is memory access, in :mod:`lazymig.linux.vm`.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "blocked_syscalls",
    "children",
    "descendants",
    "fd_links",
    "fd_path",
    "fds",
    "lowest_mappable",
    "map_file_path",
    "mount_point",
    "ns_inode",
    "ns_pids",
    "open_files_limit",
    "pid_in_use",
    "processes",
    "read_fdinfo",
    "read_maps",
    "read_stat",
    "read_status",
    "read_syscall",
    "registered_with_userfaultfd",
    "root_path",
    "sysctl_int",
    "threads",
    "tmpfs_devices",
    "userfaultfd_vmas",
]


def read_maps(pid: int) -> str:
    """The text of ``/proc/PID/maps`` (no page-table walk, unlike smaps).

    Raises:
        FileNotFoundError, ProcessLookupError: the process is gone.
    """
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def read_stat(pid: int) -> tuple[str, dict[int, int]]:
    """The state letter and the numeric fields of ``/proc/PID/stat``.

    Fields are keyed by their proc(5) number, from 4 (ppid) on; the command
    name (field 2, which may hold spaces and parentheses) is skipped.

    Raises:
        FileNotFoundError: the process (or thread) is gone.
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
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
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


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


def fd_path(pid: int, fd: int) -> str:
    """``/proc/PID/fd/FD``: fd ``fd`` of process ``pid``, to open or stat from outside."""
    return f"/proc/{pid}/fd/{fd}"


def root_path(pid: int, path: str) -> str:
    """``/proc/PID/root/PATH``: absolute ``path`` as process ``pid`` sees it (its root
    and mount namespace), to open from outside."""
    return f"/proc/{pid}/root{path}"


def map_file_path(pid: int, start: int, end: int) -> str:
    """``/proc/PID/map_files/START-END``: the file mapped at [start, end) of ``pid``,
    to open or stat from outside (needs CAP_SYS_ADMIN or ptrace rights)."""
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
    while it is listed is left out.

    Raises:
        OSError: the process is gone, or not ours to look at.
    """
    out = []
    for entry in os.scandir(f"/proc/{pid}/fd"):
        try:
            out.append((int(entry.name), str(Path(entry.path).readlink())))
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
    return Path(f"/proc/{pid}/ns/{kind}").stat().st_ino
