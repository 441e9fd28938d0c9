"""Programs nobody here wrote, migrated by lazymig alone as a user would.

Each is started as a user starts a service (its own session, its output to a
log file, stdin from /dev/null), migrated with ``lazymig.migrate(pid)`` on
loopback once it has printed a few lines, and must then go on exactly where it
was: every line it prints is ``tick N VALUE``, N counting up by one with no
line lost or repeated across the migration, VALUE what its memory (a big
array, summed on every tick) gives when it is intact. A program missing on
this machine is skipped, saying which.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import started

import lazymig

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and PR_SET_MM need root"),
]

JAVA = """
public class Loop {
  public static void main(String[] a) throws Exception {
    long[] big = new long[2_000_000];
    for (int i = 0; i < big.length; i++) big[i] = i;
    Thread worker = new Thread(() -> { while (true) { try { Thread.sleep(5); }
                                                    catch (InterruptedException e) { } } });
    worker.setDaemon(true);
    worker.start();
    for (int t = 1;; t++) {
      long s = 0; for (long v : big) s += v;
      System.out.println("tick " + t + " " + s);
      Thread.sleep(100);
    }
  }
}
"""

PERL = r'$|=1; my @a=(0..199999); for (my $n=1;;$n++) { my $s=0; $s+=$_ for @a; ' \
       r'print "tick $n $s\n"; select(undef,undef,undef,0.05); }'

# Under valgrind (memcheck), which unmaps the process's vDSO and keeps its vvar
# pages: the restored process has no vDSO either. (Its gdbserver, on by default,
# keeps named FIFOs open: --vgdb=no.)
PERL_SMALL = PERL.replace("199999", "19999")

AWK = 'BEGIN { for (i = 0; i < 20000; i++) a[i] = i; ' \
      'for (n = 1;; n++) { s = 0; for (i = 0; i < 20000; i++) s += a[i]; ' \
      'printf "tick %d %d\\n", n, s; fflush(); system("sleep 0.05") } }'

PYTHON_THREADS = """
import concurrent.futures, hashlib, itertools, time
big = list(range(200000))
pool = concurrent.futures.ThreadPoolExecutor(4)
for n in itertools.count(1):
    digests = set(pool.map(lambda i: hashlib.sha256(str(big[i]).encode()).digest(), range(8)))
    assert len(digests) == 8
    print("tick", n, sum(big), flush=True)
    time.sleep(0.05)
"""

# A temporary file (O_TMPFILE: deleted from the start) on a disk filesystem,
# written through its fd and through a shared mapping; each tick checks that
# both still reach one file holding every line written before.
PYTHON_TEMPFILE = """
import itertools, mmap, os, sys, tempfile, time
big = list(range(200000))
f = tempfile.TemporaryFile(dir=sys.argv[1])
f.write(bytes(4096)); f.flush()
m = mmap.mmap(f.fileno(), 4096)
for n in itertools.count(1):
    f.seek(0, 2); f.write(b"%d\\n" % n); f.flush()
    ok = int.from_bytes(m[:8], "little") == n - 1
    m[:8] = n.to_bytes(8, "little")
    ok = ok and int.from_bytes(os.pread(f.fileno(), 8, 0), "little") == n
    f.seek(4096)
    ok = ok and f.read().split() == [b"%d" % i for i in range(1, n + 1)]
    print("tick", n, sum(big) if ok else -1, flush=True)
    time.sleep(0.05)
"""

# Three inotify watches, the second removed (watch numbers 1 and 3 remain): each
# tick writes the third file and must read one IN_MODIFY for watch 3, none for
# another number (a watch made again under another number, or an IN_IGNORED
# left from making them, would show). One tick may read nothing: an event
# queued when the process was frozen is not migrated (nor by CRIU).
PYTHON_INOTIFY = """
import ctypes, itertools, os, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
big = list(range(200000))
paths = [os.path.join(sys.argv[1], name) for name in "abc"]
for p in paths:
    open(p, "w").close()
ino = libc.inotify_init1(os.O_NONBLOCK)
wds = [libc.inotify_add_watch(ino, p.encode(), 0x2) for p in paths]  # IN_MODIFY
libc.inotify_rm_watch(ino, wds[1])
time.sleep(0.01)
os.read(ino, 4096)  # the IN_IGNORED of the removal
missed = 0
for n in itertools.count(1):
    with open(paths[2], "a") as f:
        f.write("x")
    time.sleep(0.05)
    events = []
    try:
        data = os.read(ino, 4096)
    except BlockingIOError:
        data = b""
    while data:
        wd, mask, _, size = struct.unpack_from("iIII", data)
        events.append((wd, mask))
        data = data[16 + size:]
    missed += not events
    ok = wds == [1, 2, 3] and set(events) <= {(3, 0x2)} and missed <= 1
    print("tick", n, sum(big) if ok else -1, events, flush=True)
"""

# A process that forks all the time: a child every few ms, each inheriting a pipe
# (both ends) and living 100 ms, reaped with its status checked. Its dump starts
# while children come and go (a child forked during the checks holds the tree's
# pipe: it is of the tree, not a process outside it), and restored, its children
# are forked with the holes it still has, each a uffd of its own that faults at
# once: the daemon must not spend itself naming them, nor let their faults hold
# the background back until the transfer never ends.
PYTHON_FORKS = """
import os, time
r, w = os.pipe()
big = list(range(200000))
kids = set()
n, last = 0, time.monotonic()
while True:
    pid = os.fork()
    if pid == 0:
        time.sleep(0.1)
        os._exit(7)
    kids.add(pid)
    while kids:
        done, status = os.waitpid(-1, os.WNOHANG)
        if not done:
            break
        kids.discard(done)
        if os.waitstatus_to_exitcode(status) != 7:
            big = [-1]
    time.sleep(0.003)
    if time.monotonic() - last > 0.05:
        n, last = n + 1, time.monotonic()
        print("tick", n, sum(big), len(kids), flush=True)
"""

# multiprocessing with the spawn and forkserver start methods: a Pool of 2 (its
# workers started by the forkserver, not by the program) and a new Process each
# tick, so children are being started while the tree is checked and frozen.
PYTHON_MP = """
import hashlib, itertools, multiprocessing as mp, os, sys, time

def work(x):
    return hashlib.sha256(str(x).encode()).hexdigest()[:8]

if __name__ == "__main__":
    mp.set_start_method(sys.argv[1])
    big = list(range(200000))
    want = [work(i) for i in range(8)]
    with mp.Pool(2) as pool:
        for n in itertools.count(1):
            ok = pool.map(work, range(8)) == want
            p = mp.Process(target=work, args=(n,))
            p.start()
            p.join()
            ok = ok and p.exitcode == 0
            print("tick", n, sum(big) if ok else -1, flush=True)
            time.sleep(0.05)
"""


# A std-only Rust program, built here with rustc: a heap of 20,000 blocks of 1 to 64
# KiB with every third one freed (thousands of runs of present pages and holes), a
# 64 MiB vector touched one page in sixteen, and 8 threads taking a mutex.
RUST = """
use std::sync::{Arc, Mutex, atomic::{AtomicU64, Ordering}};
use std::{thread, time::Duration, io::Write};
fn main() {
    // A fragmented heap: 20,000 blocks of 1..64 KiB, every third one freed, and a
    // big sparse vector touched one page in sixteen.
    let mut blocks: Vec<Option<Vec<u64>>> = (0..20_000u64)
        .map(|i| Some(vec![i; 128 * (1 + (i % 64) as usize)])).collect();
    for (i, b) in blocks.iter_mut().enumerate() { if i % 3 == 0 { *b = None; } }
    let mut sparse = vec![0u64; 64 << 20 >> 3];  // 64 MiB, untouched but every 16th page
    for p in (0..sparse.len()).step_by(512 * 16) { sparse[p] = p as u64; }
    let blocks = Arc::new(blocks);
    let counter = Arc::new(AtomicU64::new(0));
    let lock = Arc::new(Mutex::new(0u64));
    for t in 0..8 {
        let (c, l) = (counter.clone(), lock.clone());
        thread::spawn(move || loop {
            c.fetch_add(1, Ordering::Relaxed);
            *l.lock().unwrap() += t;
            thread::sleep(Duration::from_millis(3));
        });
    }
    let want: u64 = blocks.iter().flatten().map(|b| b.iter().sum::<u64>()).sum();
    let sparse_sum: u64 = (0..sparse.len()).step_by(512 * 16).map(|p| p as u64).sum();
    let mut out = std::io::stdout();
    for n in 1u64.. {
        let got: u64 = blocks.iter().flatten().map(|b| b.iter().sum::<u64>()).sum();
        let sp: u64 = sparse.iter().sum();
        let ok = got == want && sp == sparse_sum;
        writeln!(out, "tick {} {}", n, if ok { want } else { 0 }).unwrap();
        out.flush().unwrap();
        thread::sleep(Duration::from_millis(50));
    }
}
"""


@dataclass(frozen=True)
class Program:
    name: str
    tool: str
    value: int
    """What every tick's VALUE must be."""

    def argv(self, tmp_path: Path) -> list[str]:
        if self.name == "java":
            # Compiled first: the single-file source launcher keeps a socket open.
            (tmp_path / "Loop.java").write_text(JAVA)
            javac = Path(shutil.which(self.tool) or self.tool).resolve().with_name("javac")
            subprocess.run([str(javac), "-d", str(tmp_path), str(tmp_path / "Loop.java")],
                           check=True, timeout=120)
            return [self.tool, "-Xmx128m", "-cp", str(tmp_path), "Loop"]
        if self.name == "perl":
            return [self.tool, "-e", PERL]
        if self.name == "rust":
            (tmp_path / "frag.rs").write_text(RUST)
            subprocess.run([self.tool, "-O", "-o", str(tmp_path / "frag"),
                            str(tmp_path / "frag.rs")], check=True, timeout=120)
            return [str(tmp_path / "frag")]
        if self.name == "valgrind":
            return [self.tool, "-q", "--vgdb=no", "perl", "-e", PERL_SMALL]
        if self.name == "awk":
            return [self.tool, AWK]
        if self.name == "python-inotify":
            return [self.tool, "-c", PYTHON_INOTIFY, str(tmp_path)]
        if self.name == "python-tempfile":
            return [self.tool, "-c", PYTHON_TEMPFILE, str(tmp_path)]
        if self.name == "python-forks":
            return [self.tool, "-c", PYTHON_FORKS]
        if self.name.startswith("python-mp-"):
            # A file: spawn's children import the main module by its path.
            (tmp_path / "mp_ticks.py").write_text(PYTHON_MP)
            return [self.tool, str(tmp_path / "mp_ticks.py"), self.name.removeprefix("python-mp-")]
        return [self.tool, "-c", PYTHON_THREADS]


PROGRAMS = [
    Program("java", "java", sum(range(2_000_000))),
    Program("perl", "perl", sum(range(200_000))),
    Program("valgrind", "valgrind", sum(range(20_000))),
    Program("rust", "rustc", sum(i * 128 * (1 + i % 64) for i in range(20_000) if i % 3)),
    Program("awk", "awk", sum(range(20_000))),  # mawk's %d stops at 2**31
    Program("python-threads", sys.executable, sum(range(200_000))),
    Program("python-tempfile", sys.executable, sum(range(200_000))),
    Program("python-inotify", sys.executable, sum(range(200_000))),
    Program("python-forks", sys.executable, sum(range(200_000))),
    Program("python-mp-spawn", sys.executable, sum(range(200_000))),
    Program("python-mp-forkserver", sys.executable, sum(range(200_000))),
]


def ticks(log: Path) -> list[tuple[int, int]]:
    out = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "tick":
            out.append((int(parts[1]), int(parts[2])))
    return out


def wait_ticks(log: Path, count: int, timeout: float) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout
    while len(seen := ticks(log)) < count:
        assert time.monotonic() < deadline, f"{count} ticks not seen in {timeout} s: {seen}"
        time.sleep(0.05)
    return seen


@pytest.mark.asyncio
@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: p.name)
async def test_a_real_program_goes_on_where_it_was(program: Program, tmp_path: Path) -> None:
    if shutil.which(program.tool) is None:
        pytest.skip(f"{program.tool} is not installed on this machine")
    log = tmp_path / "out.log"
    with started(program.argv(tmp_path), log) as source:
        before = await asyncio.to_thread(wait_ticks, log, 3, 60)
        result = await asyncio.wait_for(lazymig.migrate(source.pid), 120)
        restored = result.restored.pid
        try:
            assert result.transfer.ok
            after = await asyncio.to_thread(wait_ticks, log, len(before) + 8, 30)
            os.kill(restored, 0)  # still there
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(restored, signal.SIGKILL)
    numbers = [n for n, _ in after]
    assert numbers == list(range(1, len(numbers) + 1)), "a tick was lost or repeated"
    assert {value for _, value in after} == {program.value}, "the program's memory changed"


@pytest.mark.asyncio
async def test_tail_follows_its_file_after_the_migration(tmp_path: Path) -> None:
    """``tail -f`` (GNU coreutils) waits on an inotify watch of the file in poll(2)
    with a timeout: the watch is made again and the poll goes on (an EINTR from
    it would end tail: "error waiting for inotify and output events")."""
    if shutil.which("tail") is None:
        pytest.skip("tail is not installed on this machine")
    followed, log = tmp_path / "followed.txt", tmp_path / "out.log"
    followed.write_text("before 1\n")

    def append(line: str) -> None:
        with followed.open("a") as f:
            f.write(line + "\n")

    def shows(line: str) -> None:
        deadline = time.monotonic() + 30
        while line not in log.read_text().splitlines():
            assert time.monotonic() < deadline, f"{line!r} not followed: {log.read_text()!r}"
            time.sleep(0.05)

    with started(["tail", "-f", str(followed)], log) as source:
        await asyncio.to_thread(shows, "before 1")
        await asyncio.to_thread(append, "before 2")
        await asyncio.to_thread(shows, "before 2")
        fds = await asyncio.to_thread(lambda: list(Path(f"/proc/{source.pid}/fd").iterdir()))
        assert "anon_inode:inotify" in [str(fd.readlink()) for fd in fds]
        result = await asyncio.wait_for(lazymig.migrate(source.pid), 120)
        try:
            assert result.transfer.ok
            await asyncio.to_thread(append, "after 1")
            await asyncio.to_thread(shows, "after 1")
            os.kill(result.restored.pid, 0)  # still following
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(result.restored.pid, signal.SIGKILL)
    assert log.read_text().splitlines() == ["before 1", "before 2", "after 1"]


@pytest.mark.asyncio
async def test_top_refreshes_after_the_migration(tmp_path: Path) -> None:
    """``top -b`` (procps) keeps /proc open between refreshes, read to its end: the
    directory's offset is a position in /proc's own listing, restored as it was."""
    if shutil.which("top") is None:
        pytest.skip("top is not installed on this machine")
    log = tmp_path / "out.log"

    def refreshes() -> int:
        return log.read_text(errors="replace").count("\ntop - ")

    def more_than(count: int) -> int:
        deadline = time.monotonic() + 30
        while (now := refreshes()) <= count:
            assert time.monotonic() < deadline, f"top stopped at {now} refreshes"
            time.sleep(0.05)
        return now

    with started(["top", "-b", "-d", "0.2"], log) as source:
        await asyncio.to_thread(more_than, 2)
        result = await asyncio.wait_for(lazymig.migrate(source.pid), 120)
        try:
            assert result.transfer.ok
            seen = await asyncio.to_thread(more_than, await asyncio.to_thread(refreshes) + 3)
            os.kill(result.restored.pid, 0)  # still refreshing
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(result.restored.pid, signal.SIGKILL)
    assert seen > 5
