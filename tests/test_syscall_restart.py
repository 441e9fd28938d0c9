"""The registers saved for a thread frozen inside a syscall (UserRegs.with_syscall_restart).

A restored thread resumes through sigreturn, out of the kernel's restart logic,
so the dump applies it, as CRIU's compel does. Pure: registers in, registers out.
The real-process side is tests/test_real_programs.py's ``tail -f`` (poll) and
tests/test_dump_freeze.py (clock_nanosleep).
"""

from __future__ import annotations

import errno

import pytest

from lazymig.linux.ptrace import UserRegs
from lazymig.linux.syscalls import SYS_CLOCK_NANOSLEEP, SYS_POLL

U64 = (1 << 64) - 1
SYS_FUTEX, SYS_READ = 202, 0
ERESTARTSYS, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 514, 516


def regs(orig_rax: int, rax: int) -> UserRegs:
    fields = dict.fromkeys(UserRegs.__dataclass_fields__, 0)
    return UserRegs(**{**fields, "orig_rax": orig_rax & U64, "rax": rax & U64, "rip": 0x1002})


@pytest.mark.parametrize(("nr", "ret"), [
    (SYS_READ, -ERESTARTSYS),
    (SYS_READ, -ERESTARTNOHAND),
    (SYS_POLL, -ERESTART_RESTARTBLOCK),  # a program with no handler never sees EINTR here
])
def test_re_executed(nr: int, ret: int) -> None:
    restart = regs(nr, ret).with_syscall_restart()
    assert (restart.rip, restart.rax) == (0x1000, nr)


@pytest.mark.parametrize("nr", [SYS_CLOCK_NANOSLEEP, SYS_FUTEX])
def test_other_restart_blocks_return_eintr(nr: int) -> None:
    restart = regs(nr, -ERESTART_RESTARTBLOCK).with_syscall_restart()
    assert (restart.rip, restart.rax) == (0x1002, -errno.EINTR & U64)


def test_not_in_a_syscall_or_returned_is_unchanged() -> None:
    for orig_rax, rax in ((-1, -ERESTARTSYS), (SYS_READ, 5), (SYS_POLL, -errno.EINTR)):
        before = regs(orig_rax, rax)
        assert before.with_syscall_restart() == before
