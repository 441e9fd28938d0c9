"""Test workloads: processes whose memory content is a known function of its address.

``pattern.c`` (compile it with :func:`build_c_workload`) and ``pattern.py`` fill
a region so that the 8-byte word at address ``a`` is ``a ^ seed``, print a
``READY`` line, then a ``CHECK`` line with the region's checksum at fixed
intervals. :class:`Workload` runs either and parses the lines.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

__all__ = [
    "C_SOURCE",
    "DEFAULT_SEED",
    "PY_SCRIPT",
    "Check",
    "Ready",
    "Workload",
    "build_c_workload",
    "expected_page",
    "parse_check",
    "python_workload_argv",
]

WORKLOAD_DIR = Path(__file__).resolve().parent
C_SOURCE = WORKLOAD_DIR / "pattern.c"
PY_SCRIPT = WORKLOAD_DIR / "pattern.py"
DEFAULT_SEED = 0x5EED5EED5EED5EED
PAGE = 4096


def build_c_workload(tmpdir: str | os.PathLike[str]) -> Path:
    """Compile pattern.c with gcc into ``tmpdir``; returns the executable's path."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("no C compiler (gcc/cc) on PATH")
    out = Path(tmpdir) / "pattern"
    subprocess.run([gcc, "-O2", "-Wall", "-pthread", "-o", str(out), str(C_SOURCE)],
                   check=True, capture_output=True)
    return out


def python_workload_argv(*args: str) -> list[str]:
    """argv to run pattern.py with the current interpreter."""
    return [sys.executable, str(PY_SCRIPT), *args]


def expected_page(address: int, seed: int = DEFAULT_SEED) -> bytes:
    """The 4096 bytes the workloads keep at page ``address``."""
    return struct.pack("<512Q", *[(address + 8 * i) ^ seed for i in range(512)])


@dataclasses.dataclass(frozen=True)
class Ready:
    """The READY line."""

    pid: int
    addr: int
    size: int
    seed: int
    locked: int
    locked_size: int


@dataclasses.dataclass(frozen=True)
class Check:
    """One CHECK line."""

    n: int
    sum: int
    bad: int
    usr1: int = 0  # SIGUSR1s handled so far (pattern.c only)


def _fields(line: str) -> dict[str, int]:
    return {k: int(v, 0) for k, v in (tok.split("=", 1) for tok in line.split()[1:])}


def parse_check(line: str) -> Check:
    """A ``CHECK n=.. sum=.. bad=.. [usr1=..]`` line, parsed."""
    f = _fields(line)
    return Check(f["n"], f["sum"], f["bad"], f.get("usr1", 0))


class Workload:
    """A running workload; its stdout lines are read by a thread into a queue.

    Never ``poll()``/``wait()`` the process while it is frozen: a waitpid from
    this process would swallow the tracer's ptrace stops.
    """

    def __init__(self, argv: list[str], *, ready_timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        line = self._get(ready_timeout)
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"workload said {line!r} instead of READY")
        f = _fields(line)
        self.ready = Ready(f["pid"], f["addr"], f["size"], f["seed"], f["locked"],
                           f["locked_size"])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _get(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"workload {self.proc.pid} printed nothing for {timeout} s") \
                from None
        if line is None:
            self._lines.put(None)
            raise EOFError(f"workload {self.proc.pid} closed its output")
        return line

    @property
    def pid(self) -> int:
        """The workload's pid."""
        return self.proc.pid

    def next_check(self, timeout: float = 5.0) -> Check:
        """The next CHECK line printed (waits up to ``timeout``)."""
        while True:
            line = self._get(timeout)
            if line.startswith("CHECK"):
                return parse_check(line)

    def drain(self) -> None:
        """Forget the lines printed so far."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self._lines.put(None)
                return

    def quiet_for(self, seconds: float) -> bool:
        """True if the workload printed nothing for ``seconds`` (it is stopped)."""
        try:
            line = self._lines.get(timeout=seconds)
        except queue.Empty:
            return True
        if line is None:
            self._lines.put(None)
        return False

    def stop(self) -> None:
        """Kill the workload (if still there) and reap it."""
        try:
            self.proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)  # EOF follows the death; then the pipe can be closed
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
