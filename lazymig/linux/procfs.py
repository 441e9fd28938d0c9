"""Reading /proc/PID/stat, the one place that knows its layout."""

from __future__ import annotations

__all__ = ["read_stat"]


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
