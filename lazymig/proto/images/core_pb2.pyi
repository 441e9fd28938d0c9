# mypy: ignore-errors
# (added by lazymig.proto.images.regen: protoc's stubs use bare generics, and CRIU's
# schema names some fields like their enum type, e.g. `lsmtype lsmtype`.)
from lazymig.proto.images import core_x86_pb2 as _core_x86_pb2
from lazymig.proto.images import creds_pb2 as _creds_pb2
from lazymig.proto.images import rlimit_pb2 as _rlimit_pb2
from lazymig.proto.images import rseq_pb2 as _rseq_pb2
from lazymig.proto.images import sa_pb2 as _sa_pb2
from lazymig.proto.images import siginfo_pb2 as _siginfo_pb2
from lazymig.proto.images import timer_pb2 as _timer_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class seccomp_mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    disabled: _ClassVar[seccomp_mode]
    strict: _ClassVar[seccomp_mode]
    filter: _ClassVar[seccomp_mode]
disabled: seccomp_mode
strict: seccomp_mode
filter: seccomp_mode

class task_core_entry(_message.Message):
    __slots__ = ("task_state", "exit_code", "personality", "flags", "blk_sigset", "comm", "timers", "rlimits", "cg_set", "signals_s", "old_seccomp_mode", "old_seccomp_filter", "loginuid", "oom_score_adj", "sigactions", "child_subreaper", "blk_sigset_extended")
    TASK_STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    PERSONALITY_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    BLK_SIGSET_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    TIMERS_FIELD_NUMBER: _ClassVar[int]
    RLIMITS_FIELD_NUMBER: _ClassVar[int]
    CG_SET_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_S_FIELD_NUMBER: _ClassVar[int]
    OLD_SECCOMP_MODE_FIELD_NUMBER: _ClassVar[int]
    OLD_SECCOMP_FILTER_FIELD_NUMBER: _ClassVar[int]
    LOGINUID_FIELD_NUMBER: _ClassVar[int]
    OOM_SCORE_ADJ_FIELD_NUMBER: _ClassVar[int]
    SIGACTIONS_FIELD_NUMBER: _ClassVar[int]
    CHILD_SUBREAPER_FIELD_NUMBER: _ClassVar[int]
    BLK_SIGSET_EXTENDED_FIELD_NUMBER: _ClassVar[int]
    task_state: int
    exit_code: int
    personality: int
    flags: int
    blk_sigset: int
    comm: str
    timers: _timer_pb2.task_timers_entry
    rlimits: task_rlimits_entry
    cg_set: int
    signals_s: _siginfo_pb2.signal_queue_entry
    old_seccomp_mode: seccomp_mode
    old_seccomp_filter: int
    loginuid: int
    oom_score_adj: int
    sigactions: _containers.RepeatedCompositeFieldContainer[_sa_pb2.sa_entry]
    child_subreaper: bool
    blk_sigset_extended: int
    def __init__(self, task_state: _Optional[int] = ..., exit_code: _Optional[int] = ..., personality: _Optional[int] = ..., flags: _Optional[int] = ..., blk_sigset: _Optional[int] = ..., comm: _Optional[str] = ..., timers: _Optional[_Union[_timer_pb2.task_timers_entry, _Mapping]] = ..., rlimits: _Optional[_Union[task_rlimits_entry, _Mapping]] = ..., cg_set: _Optional[int] = ..., signals_s: _Optional[_Union[_siginfo_pb2.signal_queue_entry, _Mapping]] = ..., old_seccomp_mode: _Optional[_Union[seccomp_mode, str]] = ..., old_seccomp_filter: _Optional[int] = ..., loginuid: _Optional[int] = ..., oom_score_adj: _Optional[int] = ..., sigactions: _Optional[_Iterable[_Union[_sa_pb2.sa_entry, _Mapping]]] = ..., child_subreaper: _Optional[bool] = ..., blk_sigset_extended: _Optional[int] = ...) -> None: ...

class task_kobj_ids_entry(_message.Message):
    __slots__ = ("vm_id", "files_id", "fs_id", "sighand_id", "pid_ns_id", "net_ns_id", "ipc_ns_id", "uts_ns_id", "mnt_ns_id", "user_ns_id", "cgroup_ns_id", "time_ns_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    FILES_ID_FIELD_NUMBER: _ClassVar[int]
    FS_ID_FIELD_NUMBER: _ClassVar[int]
    SIGHAND_ID_FIELD_NUMBER: _ClassVar[int]
    PID_NS_ID_FIELD_NUMBER: _ClassVar[int]
    NET_NS_ID_FIELD_NUMBER: _ClassVar[int]
    IPC_NS_ID_FIELD_NUMBER: _ClassVar[int]
    UTS_NS_ID_FIELD_NUMBER: _ClassVar[int]
    MNT_NS_ID_FIELD_NUMBER: _ClassVar[int]
    USER_NS_ID_FIELD_NUMBER: _ClassVar[int]
    CGROUP_NS_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    files_id: int
    fs_id: int
    sighand_id: int
    pid_ns_id: int
    net_ns_id: int
    ipc_ns_id: int
    uts_ns_id: int
    mnt_ns_id: int
    user_ns_id: int
    cgroup_ns_id: int
    time_ns_id: int
    def __init__(self, vm_id: _Optional[int] = ..., files_id: _Optional[int] = ..., fs_id: _Optional[int] = ..., sighand_id: _Optional[int] = ..., pid_ns_id: _Optional[int] = ..., net_ns_id: _Optional[int] = ..., ipc_ns_id: _Optional[int] = ..., uts_ns_id: _Optional[int] = ..., mnt_ns_id: _Optional[int] = ..., user_ns_id: _Optional[int] = ..., cgroup_ns_id: _Optional[int] = ..., time_ns_id: _Optional[int] = ...) -> None: ...

class thread_sas_entry(_message.Message):
    __slots__ = ("ss_sp", "ss_size", "ss_flags")
    SS_SP_FIELD_NUMBER: _ClassVar[int]
    SS_SIZE_FIELD_NUMBER: _ClassVar[int]
    SS_FLAGS_FIELD_NUMBER: _ClassVar[int]
    ss_sp: int
    ss_size: int
    ss_flags: int
    def __init__(self, ss_sp: _Optional[int] = ..., ss_size: _Optional[int] = ..., ss_flags: _Optional[int] = ...) -> None: ...

class thread_core_entry(_message.Message):
    __slots__ = ("futex_rla", "futex_rla_len", "sched_nice", "sched_policy", "sched_prio", "blk_sigset", "sas", "pdeath_sig", "signals_p", "creds", "seccomp_mode", "seccomp_filter", "comm", "blk_sigset_extended", "rseq_entry")
    FUTEX_RLA_FIELD_NUMBER: _ClassVar[int]
    FUTEX_RLA_LEN_FIELD_NUMBER: _ClassVar[int]
    SCHED_NICE_FIELD_NUMBER: _ClassVar[int]
    SCHED_POLICY_FIELD_NUMBER: _ClassVar[int]
    SCHED_PRIO_FIELD_NUMBER: _ClassVar[int]
    BLK_SIGSET_FIELD_NUMBER: _ClassVar[int]
    SAS_FIELD_NUMBER: _ClassVar[int]
    PDEATH_SIG_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_P_FIELD_NUMBER: _ClassVar[int]
    CREDS_FIELD_NUMBER: _ClassVar[int]
    SECCOMP_MODE_FIELD_NUMBER: _ClassVar[int]
    SECCOMP_FILTER_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    BLK_SIGSET_EXTENDED_FIELD_NUMBER: _ClassVar[int]
    RSEQ_ENTRY_FIELD_NUMBER: _ClassVar[int]
    futex_rla: int
    futex_rla_len: int
    sched_nice: int
    sched_policy: int
    sched_prio: int
    blk_sigset: int
    sas: thread_sas_entry
    pdeath_sig: int
    signals_p: _siginfo_pb2.signal_queue_entry
    creds: _creds_pb2.creds_entry
    seccomp_mode: seccomp_mode
    seccomp_filter: int
    comm: str
    blk_sigset_extended: int
    rseq_entry: _rseq_pb2.rseq_entry
    def __init__(self, futex_rla: _Optional[int] = ..., futex_rla_len: _Optional[int] = ..., sched_nice: _Optional[int] = ..., sched_policy: _Optional[int] = ..., sched_prio: _Optional[int] = ..., blk_sigset: _Optional[int] = ..., sas: _Optional[_Union[thread_sas_entry, _Mapping]] = ..., pdeath_sig: _Optional[int] = ..., signals_p: _Optional[_Union[_siginfo_pb2.signal_queue_entry, _Mapping]] = ..., creds: _Optional[_Union[_creds_pb2.creds_entry, _Mapping]] = ..., seccomp_mode: _Optional[_Union[seccomp_mode, str]] = ..., seccomp_filter: _Optional[int] = ..., comm: _Optional[str] = ..., blk_sigset_extended: _Optional[int] = ..., rseq_entry: _Optional[_Union[_rseq_pb2.rseq_entry, _Mapping]] = ...) -> None: ...

class task_rlimits_entry(_message.Message):
    __slots__ = ("rlimits",)
    RLIMITS_FIELD_NUMBER: _ClassVar[int]
    rlimits: _containers.RepeatedCompositeFieldContainer[_rlimit_pb2.rlimit_entry]
    def __init__(self, rlimits: _Optional[_Iterable[_Union[_rlimit_pb2.rlimit_entry, _Mapping]]] = ...) -> None: ...

class core_entry(_message.Message):
    __slots__ = ("mtype", "thread_info", "tc", "ids", "thread_core")
    class march(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[core_entry.march]
        X86_64: _ClassVar[core_entry.march]
        ARM: _ClassVar[core_entry.march]
        AARCH64: _ClassVar[core_entry.march]
        PPC64: _ClassVar[core_entry.march]
        S390: _ClassVar[core_entry.march]
        MIPS: _ClassVar[core_entry.march]
    UNKNOWN: core_entry.march
    X86_64: core_entry.march
    ARM: core_entry.march
    AARCH64: core_entry.march
    PPC64: core_entry.march
    S390: core_entry.march
    MIPS: core_entry.march
    MTYPE_FIELD_NUMBER: _ClassVar[int]
    THREAD_INFO_FIELD_NUMBER: _ClassVar[int]
    TC_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    THREAD_CORE_FIELD_NUMBER: _ClassVar[int]
    mtype: core_entry.march
    thread_info: _core_x86_pb2.thread_info_x86
    tc: task_core_entry
    ids: task_kobj_ids_entry
    thread_core: thread_core_entry
    def __init__(self, mtype: _Optional[_Union[core_entry.march, str]] = ..., thread_info: _Optional[_Union[_core_x86_pb2.thread_info_x86, _Mapping]] = ..., tc: _Optional[_Union[task_core_entry, _Mapping]] = ..., ids: _Optional[_Union[task_kobj_ids_entry, _Mapping]] = ..., thread_core: _Optional[_Union[thread_core_entry, _Mapping]] = ...) -> None: ...
