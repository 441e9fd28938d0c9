"""Process trees dumped by lazymig (``dump(pid, tree=True)``, ``criu dump -t PID``).

tests/workloads/tree.py is a parent with a child in its own process group, a
child in its own session with a grandchild, and a zombie (exit status 7):

* a plain tree dump, the tree left running: one pstree entry per process,
  parents before children, with the right ppid, pgid, sid and threads; each
  live process has its own core, mm, pagemap, fdinfo and ``pages-<n>`` images,
  and its pages hold its own memory; the zombie has only a core image, task
  state TASK_DEAD and its exit status; released, the tree runs on and the
  parent reaps its zombie by pid with status 7;
* without ``leave_running`` every process of the tree is killed;
* ``crit`` decodes the tree's pstree and the zombie's core;
* a plain tree dump restored by ``Restorer``: every process comes back forked
  by its restored parent, zombie included, each in its group and session as
  dumped (the root, in the test's, in the restorer's), under its dumped pid
  (here once init reaped the killed source, else in a pid namespace of the
  tree's own); the restored parent reaps its zombie by pid (status 7) and
  reaps its killed children;
* ``lazymig.migrate`` of the tree (lazy): each process's lazy pages come from
  the page server by its pid, each restored process holds its own memory, the
  tree has its links, groups and sessions; the source held the pids meanwhile,
  so the tree is in a pid namespace of its own, and the parent reaps its
  zombie by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import free_port, on_uvloop

import lazymig
import lazymig.dump.dumper
from lazymig.dump import dump
from lazymig.dump.freeze import UnsupportedTargetError
from lazymig.dump.tree import TASK_DEAD
from lazymig.linux.procfs import children
from lazymig.linux.ptrace import process_alive
from lazymig.proto.images import ImageKind, ImagesDir
from lazymig.restore import Restorer
from lazymig.testing import HostPair
from lazymig.testing.plugin import StartCommand
from lazymig.testing.workload import OutputLines

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace needs root"),
]

TREE = Path(__file__).parent / "workloads" / "tree.py"
ZOMBIE_STATUS = 7 << 8


def check_shared(say: Callable[[str], str]) -> None:
    """The parent and its ``group`` child still share their MAP_SHARED page: the
    child's counter moves for the parent, the parent's word reaches the child."""
    first = [int(w) for w in say("shared 1001").split()[1:]]
    deadline = time.monotonic() + 10
    while True:
        now = [int(w) for w in say("shared 1002").split()[1:]]
        if now[0] > first[0] and now[2] in (1001, 1002):
            return
        assert time.monotonic() < deadline, (first, now)
        time.sleep(0.05)


class Tree:
    """tests/workloads/tree.py running; ``pids`` by name (parent too)."""

    def __init__(self, proc: subprocess.Popen[str], pids: dict[str, int]) -> None:
        self.proc = proc
        self.pids = pids

    def say(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline() if line != "end" else ""


@contextlib.contextmanager
def tree_workload() -> Iterator[Tree]:
    proc = subprocess.Popen([sys.executable, str(TREE)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    pids: dict[str, int] = {}
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        pids = {k: int(v) for k, v in (f.split("=") for f in line.split()[1:])}
        pids["parent"] = proc.pid
        yield Tree(proc, pids)
    finally:
        for name in ("group", "session", "grandchild"):
            with contextlib.suppress(ProcessLookupError, KeyError):
                os.kill(pids[name], signal.SIGKILL)
        proc.kill()
        proc.wait(timeout=10)


def marker_in_pages(images: ImagesDir, rank: int, name: str) -> bool:
    data = images.pages_path(rank).read_bytes()
    return f"tree-{name}-tree-{name}-".encode() in data


@pytest.mark.asyncio
async def test_a_tree_is_dumped_with_its_zombie_groups_and_sessions(tmp_path: Path) -> None:
    with tree_workload() as t:
        p = t.pids
        await dump(p["parent"], tmp_path, leave_running=True, tree=True)
        images = ImagesDir(tmp_path)
        entries = {e.pid: e for e in images.pstree()}
        order = [e.pid for e in images.pstree()]
        assert set(entries) == set(p.values())
        assert order[0] == p["parent"] and entries[p["parent"]].ppid == 0
        for e in entries.values():  # every parent before its children
            assert e.ppid == 0 or order.index(e.ppid) < order.index(e.pid)
        parent_sid = os.getsid(p["parent"])
        expect = {  # name: (ppid, pgid, sid)
            "group": (p["parent"], p["group"], parent_sid),
            "session": (p["parent"], p["session"], p["session"]),
            "grandchild": (p["session"], p["session"], p["session"]),
            "zombie": (p["parent"], os.getpgid(p["parent"]), parent_sid),
        }
        for name, (ppid, pgid, sid) in expect.items():
            e = entries[p[name]]
            assert (e.ppid, e.pgid, e.sid) == (ppid, pgid, sid), name
            assert list(e.threads) == [p[name]]
        live = [pid for pid in order if pid != p["zombie"]]
        for rank, pid in enumerate(live, start=1):
            name = next(k for k, v in p.items() if v == pid)
            core = images.core(pid)
            assert core.ids.files_id == rank and core.tc.task_state != TASK_DEAD
            assert images.pagemap(pid).pages_id == rank
            assert images.mm(pid).vmas
            assert images.image_path(ImageKind.FDINFO, rank).exists()
            assert marker_in_pages(images, rank, name), name
            for other in ("group", "session", "grandchild"):
                if other != name:
                    assert not marker_in_pages(images, rank, other), (name, other)
        zombie = images.core(p["zombie"])
        assert zombie.tc.task_state == TASK_DEAD and zombie.tc.exit_code == ZOMBIE_STATUS
        assert not zombie.HasField("thread_info")
        assert not images.image_path(ImageKind.MM, p["zombie"]).exists()
        # Released, the tree runs on: the parent reaps its zombie by pid.
        assert all(process_alive(p[n]) for n in ("parent", "group", "session", "grandchild"))
        await asyncio.to_thread(check_shared, t.say)
        reaped = await asyncio.to_thread(t.say, "reap")
        assert reaped.strip() == f"REAPED status={ZOMBIE_STATUS} by=pid"
        t.say("end")
        assert await asyncio.to_thread(t.proc.wait, 10) == 0


@pytest.mark.asyncio
async def test_a_dumped_tree_is_killed_whole(tmp_path: Path) -> None:
    with tree_workload() as t:
        await dump(t.pids["parent"], tmp_path, tree=True)
        # (The dumper, the parent's parent here, reaped it as its tracer: no status.)
        for name in ("parent", "group", "session", "grandchild"):
            assert not process_alive(t.pids[name]), name


@pytest.mark.crit
@pytest.mark.skipif(shutil.which("crit") is None, reason="crit is not installed")
@pytest.mark.asyncio
async def test_crit_decodes_the_tree(tmp_path: Path) -> None:
    with tree_workload() as t:
        p = t.pids
        await dump(p["parent"], tmp_path, leave_running=True, tree=True)

    def decode(name: str) -> list[dict[str, object]]:
        out = subprocess.run(["crit", "decode", "-i", str(tmp_path / name)], check=True,
                             capture_output=True, timeout=60).stdout
        entries: list[dict[str, object]] = json.loads(out)["entries"]
        return entries

    tree = await asyncio.to_thread(decode, "pstree.img")
    assert {e["pid"] for e in tree} == set(p.values())
    by_pid = {e["pid"]: e for e in tree}
    assert by_pid[p["grandchild"]]["ppid"] == p["session"]
    assert by_pid[p["session"]]["sid"] == p["session"]
    (zombie,) = await asyncio.to_thread(decode, f"core-{p['zombie']}.img")
    tc = zombie["tc"]
    assert isinstance(tc, dict) and tc["task_state"] == TASK_DEAD
    assert tc["exit_code"] == ZOMBIE_STATUS
    for name in ("files.img", "fdinfo-2.img", f"pagemap-{p['grandchild']}.img"):
        await asyncio.to_thread(decode, name)


CHILDREN = ("group", "session", "zombie", "grandchild")


def pids_freed(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def stat_of(pid: int) -> tuple[str, int, int, int]:
    """State, ppid, pgid, sid from /proc/PID/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    f = raw[raw.rfind(")") + 2:].split()
    return f[0], int(f[1]), int(f[2]), int(f[3])


@pytest.mark.asyncio
async def test_a_dumped_tree_is_restored_with_its_zombie_groups_and_sessions(
        tmp_path: Path) -> None:
    with tree_workload() as t:
        old = t.pids
        await dump(old["parent"], tmp_path, tree=True)
    # The killed source's processes are reaped by init, which may take a while
    # here; once their pids are free the tree gets them back here, else in a pid
    # namespace of its own.
    await asyncio.to_thread(pids_freed, [old[n] for n in CHILDREN])
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    restorer = Restorer(tmp_path, stdio=(in_r, out_w, 2))
    try:
        result = await restorer.run()
        os.close(in_r)
        os.close(out_w)
        new = {name: restorer.tree_pids[pid] for name, pid in old.items()}
        assert result.pid == new["parent"] and result.image_pid == old["parent"]
        me = os.getpid()
        assert stat_of(new["parent"])[1:] == (me, os.getpgid(0), os.getsid(0))
        assert stat_of(new["group"])[1:] == (new["parent"], new["group"], os.getsid(0))
        assert stat_of(new["session"])[1:] == (new["parent"], new["session"], new["session"])
        assert stat_of(new["grandchild"])[1:] == (new["session"], new["session"],
                                                  new["session"])
        assert stat_of(new["zombie"])[:2] == ("Z", new["parent"])
        same = all(new[n] == old[n] for n in old)
        assert same == (result.pid_namespace is None)
        with os.fdopen(in_w, "w") as cmd, os.fdopen(out_r) as out:
            def say(line: str) -> str:
                cmd.write(line + "\n")
                cmd.flush()
                return out.readline()

            await asyncio.to_thread(check_shared, say)
            cmd.write("reap\n")
            cmd.flush()
            line = await asyncio.to_thread(out.readline)
            assert line.strip() == f"REAPED status={ZOMBIE_STATUS} by=pid"
            for name in ("grandchild", "session", "group"):
                os.kill(new[name], signal.SIGKILL)
            cmd.write("quit\n")
            cmd.flush()
            line = await asyncio.to_thread(out.readline)
            assert line.strip() == "QUIT reaped=2"
        assert await asyncio.to_thread(restorer.wait) == 0
    finally:
        restorer.kill()
        for pid in restorer.tree_pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def holds_marker(pid: int, name: str) -> bool:
    """True if a private writable mapping of ``pid`` holds ``name``'s marker pages."""
    marker = f"tree-{name}-".encode() * 300
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if fields[1] != "rw-p":
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            with contextlib.suppress(OSError):
                mem.seek(start)
                if marker in mem.read(end - start):
                    return True
    return False


def tree_of(pid: int) -> dict[str, int]:
    """The restored workload's pids by name, found from its root by the group and
    session each child leads."""
    kids = children(pid)
    found = {"parent": pid}
    for kid in kids:
        state, _, pgid, sid = stat_of(kid)
        if state == "Z":
            found["zombie"] = kid
        elif sid == kid:
            found["session"] = kid
            (found["grandchild"],) = children(kid)
        elif pgid == kid:
            found["group"] = kid
    assert len(found) == 5, found
    return found


@pytest.mark.asyncio
async def test_a_tree_migrated_lazily(tmp_path: Path) -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    new: dict[str, int] = {}
    try:
        with tree_workload() as t:
            async with asyncio.timeout(60), \
                    lazymig.migrate(t.pids["parent"], stdio=(in_r, out_w, 2)) as migration:
                os.close(in_r)
                os.close(out_w)
                in_r = out_w = -1
                new = await asyncio.to_thread(tree_of, migration.process.pid)
                assert stat_of(new["grandchild"])[1:] == (new["session"], new["session"],
                                                          new["session"])
            result = await migration.done
        assert result.dump.lazy_pages > 0
        for name in ("parent", "group", "session", "grandchild"):
            assert await asyncio.to_thread(holds_marker, new[name], name), name
        with os.fdopen(in_w, "w") as cmd, os.fdopen(out_r) as out:
            in_w = out_r = -1
            def say(line: str) -> str:
                cmd.write(line + "\n")
                cmd.flush()
                return out.readline()

            await asyncio.to_thread(check_shared, say)
            cmd.write("reap\n")
            cmd.flush()
            line = await asyncio.to_thread(out.readline)
            # The source held the pids: the tree has them in a namespace of its own.
            assert migration.process.result.pid_namespace is not None
            assert line.strip() == f"REAPED status={ZOMBIE_STATUS} by=pid"
            for name in ("grandchild", "session", "group"):
                os.kill(new[name], signal.SIGKILL)
            cmd.write("quit\n")
            cmd.flush()
            assert (await asyncio.to_thread(out.readline)).strip() == "QUIT reaped=2"
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            if fd >= 0:
                os.close(fd)
        for pid in new.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.asyncio
async def test_a_tree_migrated_with_the_three_clis(
        lazymig_hosts: HostPair, lazymig_command: StartCommand, tmp_path: Path) -> None:
    hosts = lazymig_hosts
    loop = on_uvloop()
    source_images, images = tmp_path / "source", tmp_path / "destination"
    source_images.mkdir()
    port = "27" if hosts.kind == "netns" else str(free_port())
    read_fd, write_fd = os.pipe()
    lines = OutputLines(read_fd)
    new: dict[str, int] = {}
    try:
        with tree_workload() as t:
            dumper = await lazymig_command("dump", "-t", str(t.pids["parent"]), "--lazy-pages",
                                           "--address", hosts.source.address, "--port", port,
                                           "-D", source_images, host=hosts.source, uvloop=loop)
            await asyncio.to_thread(shutil.copytree, source_images, images)
            daemon = await lazymig_command(
                "lazy-pages", "--page-server", "--address", hosts.source.address, "--port",
                port, "-D", images, host=hosts.destination, uvloop=loop)
            # --shell-job: the parent's stdin and stdout, pipes to the test, stay
            # behind; the restorer's take their place.
            restore = await lazymig_command("restore", "--lazy-pages", "-D", images, "-d",
                                            "--shell-job", host=hosts.destination,
                                            ready=False, stdout=write_fd, uvloop=loop)
            os.close(write_fd)
            write_fd = -1
            async with asyncio.timeout(60):
                assert await restore.wait() == 0, restore.log()
                pid = int(await asyncio.to_thread(lines.next, 10.0))
                assert hosts.destination.owns(pid)
                new = await asyncio.to_thread(tree_of, pid)
                assert await dumper.wait() == 0, dumper.log()  # every page served
                await daemon.wait()
        for name in ("parent", "group", "session", "grandchild"):
            assert await asyncio.to_thread(holds_marker, new[name], name), name
        os.kill(new["parent"], signal.SIGUSR1)
        reaped = await asyncio.to_thread(lines.next, 10.0)
        assert reaped == f"REAPED status={ZOMBIE_STATUS} by=pid"
        for name in ("grandchild", "session", "group"):
            os.kill(new[name], signal.SIGKILL)
        os.kill(new["parent"], signal.SIGUSR2)
        assert await asyncio.to_thread(lines.next, 10.0) == "QUIT reaped=2"
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        for pid in new.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        lines.close()


FORKER = """
import os, sys, time
print("READY", flush=True)
while True:
    if os.fork() == 0:
        time.sleep(0.003)
        os._exit(3)
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    time.sleep(0.001)
"""


@contextlib.contextmanager
def forker() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", FORKER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "READY\n"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.asyncio
async def test_children_forked_and_exiting_while_freezing_are_caught(tmp_path: Path) -> None:
    """A parent forking a short-lived child every few ms: each freeze holds every
    child it has then, live (with its images) or already a zombie (a core only)."""
    with forker() as proc:
        kinds: set[str] = set()
        for i in range(6):
            images = ImagesDir(tmp_path / str(i))
            images.path.mkdir()
            await dump(proc.pid, images.path, leave_running=True, tree=True)
            entries = images.pstree()
            assert entries[0].pid == proc.pid
            for e in entries[1:]:
                assert e.ppid == proc.pid
                core = images.core(e.pid)
                if core.tc.task_state == TASK_DEAD:
                    assert core.tc.exit_code == 3 << 8
                    kinds.add("zombie")
                else:
                    assert images.mm(e.pid).vmas
                    kinds.add("live")
            assert process_alive(proc.pid)
        assert kinds  # children were caught (most runs catch one, live or dead)


PARENT_OF_ONE = ("import subprocess, sys, time\n"
                 "child = subprocess.Popen(['sleep', '300'])\n"
                 "print('READY', flush=True)\n"
                 "time.sleep(300)\n")


@contextlib.contextmanager
def parent_of_one() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", PARENT_OF_ONE], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "READY\n"
        yield proc
    finally:
        for kid in children(proc.pid):
            os.kill(kid, signal.SIGKILL)
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.asyncio
@pytest.mark.parametrize("tree", [None, False])
async def test_a_child_forked_after_the_choice_to_dump_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tree: bool | None) -> None:
    """The choice between one process and a tree is made before the freeze; a child
    forked in between (awk's ``system()``, a shell's commands) is found once the
    process is frozen. Left to choose, the dump resumes it untouched and dumps the
    tree; told ``tree=False``, it refuses."""
    monkeypatch.setattr(lazymig.dump.dumper, "has_children", lambda pid: False)  # stale
    with parent_of_one() as proc:
        if tree is False:
            with pytest.raises(UnsupportedTargetError, match="while it was being frozen alone"):
                await dump(proc.pid, tmp_path, leave_running=True, tree=tree)
        else:
            await dump(proc.pid, tmp_path, leave_running=True, tree=tree)
            entries = ImagesDir(tmp_path).pstree()
            assert [e.pid for e in entries] == [proc.pid, *children(proc.pid)]
        assert process_alive(proc.pid)
