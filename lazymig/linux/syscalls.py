"""x86_64 syscall numbers: the one table every injected or direct syscall uses
(arch/x86/entry/syscalls/syscall_64.tbl)."""

from __future__ import annotations

from typing import Final

SYS_CLOSE: Final = 3
SYS_LSEEK: Final = 8
SYS_MMAP: Final = 9
SYS_MUNMAP: Final = 11
SYS_BRK: Final = 12
SYS_RT_SIGACTION: Final = 13
SYS_IOCTL: Final = 16
SYS_MREMAP: Final = 25
SYS_MADVISE: Final = 28
SYS_GETITIMER: Final = 36
SYS_SETITIMER: Final = 38
SYS_GETPID: Final = 39
SYS_RECVMSG: Final = 47
SYS_SOCKETPAIR: Final = 53
SYS_CLONE: Final = 56
SYS_FORK: Final = 57
SYS_WAIT4: Final = 61
SYS_FCNTL: Final = 72
SYS_FTRUNCATE: Final = 77
SYS_CHDIR: Final = 80
SYS_UMASK: Final = 95
SYS_SETPGID: Final = 109
SYS_SETSID: Final = 112
SYS_SETGROUPS: Final = 116
SYS_SETRESUID: Final = 117
SYS_SETRESGID: Final = 119
SYS_SETFSUID: Final = 122
SYS_SETFSGID: Final = 123
SYS_RT_SIGQUEUEINFO: Final = 129
SYS_SIGALTSTACK: Final = 131
SYS_PERSONALITY: Final = 135
SYS_SETPRIORITY: Final = 141
SYS_SCHED_SETSCHEDULER: Final = 144
SYS_PRCTL: Final = 157
SYS_SET_TID_ADDRESS: Final = 218
SYS_EXIT_GROUP: Final = 231
SYS_WAITID: Final = 247
SYS_OPENAT: Final = 257
SYS_SET_ROBUST_LIST: Final = 273
SYS_GET_ROBUST_LIST: Final = 274
SYS_VMSPLICE: Final = 278
SYS_DUP3: Final = 292
SYS_PIPE2: Final = 293
SYS_RT_TGSIGQUEUEINFO: Final = 297
SYS_KCMP: Final = 312
SYS_MEMFD_CREATE: Final = 319
SYS_USERFAULTFD: Final = 323
SYS_RSEQ: Final = 334
SYS_CLONE3: Final = 435
SYS_CLOSE_RANGE: Final = 436
SYS_PIDFD_GETFD: Final = 438
