"""Reading /proc/PID files whose layout only this module knows (stat, smaps)."""

from __future__ import annotations

__all__ = ["read_stat", "read_status", "registered_with_userfaultfd"]


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
