"""Workloads whose memory content is a known function of its address.

``pattern.c`` (compiled on demand by :func:`build_c_workload`) and ``pattern.py``
(run by :func:`python_workload_argv`) map a region and fill it so that the
8-byte word at address ``a`` is ``a ^ seed``; they print a ``READY`` line, then
a ``CHECK`` line with the region's checksum and the number of words that
differ from the pattern at fixed intervals. After a migration the restored
process goes on printing them: ``bad=0`` and the source's ``sum`` say its
memory arrived intact. :class:`Workload` runs either and parses the lines::

    from lazymig.testing.workload import Workload, build_c_workload

    with Workload([str(build_c_workload()), "--mib", "8"]) as w:
        before = w.next_check()
        ...                                  # migrate w.pid
        assert before.bad == 0

The C workload's options (``--mib``, ``--seed``, ``--interval-ms``,
``--threads``, ``--locked-kib``, ``--shared-kib``) are listed at the top of
``pattern.c``; the Python one takes ``--mib``, ``--seed`` and ``--interval-ms``.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from lazymig.errors import ConfigurationError, LazyMigError

__all__ = [
    "C_SOURCE",
    "DEFAULT_SEED",
    "PY_SCRIPT",
    "Check",
    "CompilerMissingError",
    "OutputLines",
    "Ready",
    "Workload",
    "WorkloadError",
    "build_c_workload",
    "expected_page",
    "parse_check",
    "pattern_bytes",
    "python_workload_argv",
]

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
C_SOURCE = _HERE / "pattern.c"
"""The C workload's source (package data)."""
PY_SCRIPT = _HERE / "pattern.py"
"""The Python workload (standard library only; run it with any CPython 3.11+)."""
DEFAULT_SEED = 0x5EED5EED5EED5EED
PAGE = 4096
_CFLAGS = ("-O2", "-Wall", "-pthread")
_EXE_NAME = "pattern"  # its comm: tests compare /proc/PID/status Name with it


class WorkloadError(LazyMigError):
    """A test workload could not be built or did not behave as a workload should."""


class CompilerMissingError(WorkloadError, ConfigurationError):
    """No C compiler to build the C workload with."""


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lazymig" / "workloads"


def build_c_workload(directory: str | os.PathLike[str] | None = None) -> Path:
    """Compile pattern.c with gcc (or cc) once; returns the executable's path.

    The executable goes into ``directory/<hash>/pattern`` (default: the user's
    cache, ``$XDG_CACHE_HOME/lazymig/workloads``), where ``<hash>`` covers the
    source, the compiler and the flags: later calls reuse it, and concurrent
    builds never see a half-written file.

    Raises:
        CompilerMissingError: neither ``gcc`` nor ``cc`` is on ``PATH``
            (install gcc and libc6-dev, or use the Python workload).
        WorkloadError: the compiler failed (its output is in the message).
    """
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise CompilerMissingError(
            "no C compiler (gcc or cc) on PATH for the C pattern workload: install gcc and "
            "libc6-dev, or use the Python workload (python_workload_argv)")
    key = hashlib.sha256(C_SOURCE.read_bytes())
    key.update(repr((compiler, _CFLAGS)).encode())
    out = Path(directory or _cache_root()) / key.hexdigest()[:16] / _EXE_NAME
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{_EXE_NAME}.{os.getpid()}.{threading.get_ident()}")
    try:
        subprocess.run([compiler, *_CFLAGS, "-o", str(partial), str(C_SOURCE)],
                       check=True, capture_output=True, text=True, timeout=120)
        partial.replace(out)
    except subprocess.CalledProcessError as exc:
        raise WorkloadError(f"{compiler} could not build {C_SOURCE}: {exc.stderr}") from exc
    finally:
        partial.unlink(missing_ok=True)
    log.info("built the C pattern workload: %s", out)
    return out


def python_workload_argv(*args: str) -> list[str]:
    """argv to run pattern.py with the current interpreter, e.g. ``("--mib", "8")``."""
    return [sys.executable, str(PY_SCRIPT), *args]


def expected_page(address: int, seed: int = DEFAULT_SEED) -> bytes:
    """The 4096 bytes the workloads keep at page ``address``."""
    return pattern_bytes(address, PAGE, seed)


def pattern_bytes(address: int, length: int, seed: int = DEFAULT_SEED) -> bytes:
    """The ``length`` bytes (a multiple of 8) the workloads keep from ``address`` on."""
    words = length // 8
    if length != words * 8 or address % 8:
        raise ConfigurationError(f"the pattern is made of aligned 8-byte words: "
                                 f"{address:#x}+{length} is not")
    addresses = array.array("Q", range(address, address + length, 8)).tobytes()
    # One XOR over the whole range as a big integer: seconds faster than per word.
    mask = int.from_bytes(seed.to_bytes(8, sys.byteorder) * words, sys.byteorder)
    return (int.from_bytes(addresses, sys.byteorder) ^ mask).to_bytes(length, sys.byteorder)


@dataclasses.dataclass(frozen=True)
class Ready:
    """The READY line: where the pattern region is."""

    pid: int
    addr: int
    size: int
    seed: int
    locked: int
    """Address of the mlock-ed region (``--locked-kib``), 0 without one."""
    locked_size: int

    @property
    def regions(self) -> list[tuple[int, int]]:
        """``(address, length)`` of every region holding the pattern."""
        return [(a, n) for a, n in ((self.addr, self.size), (self.locked, self.locked_size))
                if n]


@dataclasses.dataclass(frozen=True)
class Check:
    """One CHECK line."""

    n: int
    sum: int
    bad: int
    usr1: int = 0  # SIGUSR1s handled so far (pattern.c only)

    def same_memory(self, before: Check) -> bool:
        """True if this line shows the memory ``before`` showed, intact (``bad`` 0)."""
        return (self.sum, self.bad) == (before.sum, 0)


def _fields(line: str) -> dict[str, int]:
    return {k: int(v, 0) for k, v in (tok.split("=", 1) for tok in line.split()[1:])}


def parse_check(line: str) -> Check:
    """A ``CHECK n=.. sum=.. bad=.. [usr1=..]`` line, parsed."""
    f = _fields(line)
    return Check(f["n"], f["sum"], f["bad"], f.get("usr1", 0))


class OutputLines:
    """Lines of a process's output, read by a thread into a queue.

    For a workload's stdout (:class:`Workload` uses it) or a pipe a restored
    workload writes to::

        read_fd, write_fd = os.pipe()
        ...                                   # restore with stdio=(0, write_fd, 2)
        os.close(write_fd)
        lines = OutputLines(read_fd)
        check = await asyncio.to_thread(lines.next_check)
        lines.close()

    The waiting methods block: call them from a thread in async code.
    """

    def __init__(self, file: IO[str] | int) -> None:
        """Read ``file`` (a text file, or an fd to own and read as one) until EOF."""
        self._file = os.fdopen(file, "r") if isinstance(file, int) else file
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"lazymig output fd {self._file.fileno()}")
        self._reader.start()

    def _read(self) -> None:
        try:
            for line in self._file:
                self._lines.put(line.rstrip("\n"))
        except (ValueError, OSError):
            pass  # closed under us by close()
        self._lines.put(None)

    def next(self, timeout: float = 5.0) -> str:
        """The next line (waits up to ``timeout`` seconds).

        Raises:
            TimeoutError: nothing came in time.
            EOFError: the writer closed its end.
        """
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no output line for {timeout} s") from None
        if line is None:
            self._lines.put(None)
            raise EOFError("the process closed its output")
        return line

    def next_check(self, timeout: float = 5.0) -> Check:
        """The next CHECK line (waits up to ``timeout`` for each line)."""
        while True:
            line = self.next(timeout)
            if line.startswith("CHECK"):
                return parse_check(line)

    def drain(self) -> None:
        """Forget the lines read so far."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self._lines.put(None)
                return

    def quiet_for(self, seconds: float) -> bool:
        """True if no line came for ``seconds`` (the process is stopped, or gone quiet)."""
        try:
            line = self._lines.get(timeout=seconds)
        except queue.Empty:
            return True
        if line is None:
            self._lines.put(None)
        return False

    def close(self, timeout: float = 5.0) -> None:
        """Wait for the reader to see EOF (up to ``timeout``), then close the file."""
        self._reader.join(timeout=timeout)
        self._file.close()


class Workload:
    """A running workload; its stdout lines are read by a thread into a queue.

    A context manager: leaving it kills and reaps the workload. Never
    ``proc.poll()``/``proc.wait()`` it while it is frozen: a waitpid from this
    process would swallow the tracer's ptrace stops.

    Raises:
        WorkloadError: the workload did not print its READY line.
    """

    def __init__(self, argv: list[str], *, ready_timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self.proc.stdout is not None
        self.lines = OutputLines(self.proc.stdout)
        try:
            line = self.lines.next(ready_timeout)
        except (TimeoutError, EOFError) as exc:
            self.stop()
            raise WorkloadError(f"workload {argv[0]} never said READY: {exc}") from exc
        if not line.startswith("READY"):
            self.stop()
            raise WorkloadError(f"workload {argv[0]} said {line!r} instead of READY")
        f = _fields(line)
        self.ready = Ready(f["pid"], f["addr"], f["size"], f["seed"], f["locked"],
                           f["locked_size"])

    @property
    def pid(self) -> int:
        """The workload's pid."""
        return self.proc.pid

    def next_check(self, timeout: float = 5.0) -> Check:
        """The next CHECK line printed (waits up to ``timeout``)."""
        return self.lines.next_check(timeout)

    def drain(self) -> None:
        """Forget the lines printed so far."""
        self.lines.drain()

    def quiet_for(self, seconds: float) -> bool:
        """True if the workload printed nothing for ``seconds`` (it is stopped)."""
        return self.lines.quiet_for(seconds)

    def stop(self) -> None:
        """Kill the workload (if still there) and reap it; idempotent."""
        try:
            self.proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.lines.close()  # EOF follows the death; then the pipe can be closed

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<lazymig.testing.Workload pid={self.pid} {self.ready.size >> 20} MiB>"
