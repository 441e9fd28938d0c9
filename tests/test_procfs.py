"""lazymig.linux.procfs, the one home of /proc reads, against a real child process:
each reader's typed result is what the kernel reports through another interface."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazymig.linux import procfs
from lazymig.proto.constants import PAGE_SIZE

_AT_PAGESZ = 6


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A sleeping Python child, its comm set, its two threads started."""
    code = ("import ctypes, threading, sys, time\n"
            "ctypes.CDLL(None).prctl(15, b'procfs-child', 0, 0, 0)\n"
            "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
            "sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_stat_comm_and_threads(child: subprocess.Popen[bytes]) -> None:
    pid = child.pid
    state, fields = procfs.read_stat(pid)
    assert state in ("S", "R")
    assert fields[4] == os.getpid()  # ppid
    tids = sorted(procfs.threads(pid))
    assert len(tids) == 2 and tids[0] == pid
    # The thread's own stat and comm; the leader's comm is the one prctl set.
    assert procfs.read_stat(pid, tids[1])[0] in ("S", "R")
    assert procfs.read_stat(pid, tids[1])[1][22] >= fields[22]  # started after the process
    assert procfs.read_comm(pid) == "procfs-child"
    assert procfs.read_comm(pid, pid) == "procfs-child"  # the leader's own


def test_links_numbers_and_auxv(child: subprocess.Popen[bytes]) -> None:
    pid = child.pid
    assert procfs.read_link(pid, "exe") == str(Path(sys.executable).resolve())
    assert procfs.read_link(pid, "cwd") == str(Path.cwd())
    assert procfs.read_link(pid, "root") == "/"
    assert Path(procfs.link_path(pid, "exe")).stat().st_ino == Path(sys.executable).stat().st_ino
    assert procfs.read_int(pid, "oom_score_adj") == procfs.read_int(os.getpid(), "oom_score_adj")
    assert procfs.read_int(pid, "personality", 16) == 0
    auxv = procfs.read_auxv(pid)
    assert auxv[-2:] == (0, 0)  # AT_NULL last
    pairs = dict(zip(auxv[::2], auxv[1::2], strict=True))
    assert pairs[_AT_PAGESZ] == PAGE_SIZE
    assert procfs.uptime() > 0


def test_smaps_and_pagemap(child: subprocess.Popen[bytes]) -> None:
    pid = child.pid
    smaps = procfs.read_smaps(pid)
    # smaps has the lines of maps (the same mappings), each followed by its fields.
    maps = procfs.read_maps(pid).splitlines()
    assert [ln for ln in smaps.splitlines() if not ln.split(None, 1)[0].endswith(":")] == maps
    start = int(maps[0].split("-")[0], 16)
    fd = procfs.open_pagemap(pid)
    try:
        assert len(os.pread(fd, 8, (start // PAGE_SIZE) * 8)) == 8
    finally:
        os.close(fd)
    own = procfs.open_pagemap("self")
    os.close(own)


def test_paths_name_the_same_objects(child: subprocess.Popen[bytes]) -> None:
    pid = child.pid
    assert Path(procfs.ns_path(pid, "pid")).stat().st_ino == procfs.ns_inode(os.getpid(), "pid")
    # fd 1 of the child is the pipe we read.
    assert child.stdout is not None
    assert Path(procfs.fd_path(pid, 1)).stat().st_ino == os.fstat(child.stdout.fileno()).st_ino
    assert (1, f"pipe:[{os.fstat(child.stdout.fileno()).st_ino}]") in procfs.fd_links(pid)
    assert procfs.fd_path("self", 3) == "/proc/self/fd/3"
    assert pid in procfs.processes()
    assert procfs.open_files_limit(pid) == resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def test_gone_process_raises() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    deadline = time.monotonic() + 5
    while procfs.pid_in_use(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)  # reaped: the pid is free unless reused at once
    if procfs.pid_in_use(proc.pid):
        pytest.skip("the pid was reused at once: nothing to test against")
    for read in (procfs.read_smaps, procfs.read_comm, procfs.read_auxv, procfs.read_stat):
        with pytest.raises(FileNotFoundError):
            read(proc.pid)
    with pytest.raises(FileNotFoundError):
        procfs.read_link(proc.pid, "exe")
    assert procfs.threads(proc.pid) == []
