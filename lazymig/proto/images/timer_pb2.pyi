# mypy: ignore-errors
# (added by lazymig.proto.images.regen: protoc's stubs use bare generics, and CRIU's
# schema names some fields like their enum type, e.g. `lsmtype lsmtype`.)
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class itimer_entry(_message.Message):
    __slots__ = ("isec", "iusec", "vsec", "vusec")
    ISEC_FIELD_NUMBER: _ClassVar[int]
    IUSEC_FIELD_NUMBER: _ClassVar[int]
    VSEC_FIELD_NUMBER: _ClassVar[int]
    VUSEC_FIELD_NUMBER: _ClassVar[int]
    isec: int
    iusec: int
    vsec: int
    vusec: int
    def __init__(self, isec: _Optional[int] = ..., iusec: _Optional[int] = ..., vsec: _Optional[int] = ..., vusec: _Optional[int] = ...) -> None: ...

class posix_timer_entry(_message.Message):
    __slots__ = ("it_id", "clock_id", "si_signo", "it_sigev_notify", "sival_ptr", "overrun", "isec", "insec", "vsec", "vnsec", "notify_thread_id")
    IT_ID_FIELD_NUMBER: _ClassVar[int]
    CLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    SI_SIGNO_FIELD_NUMBER: _ClassVar[int]
    IT_SIGEV_NOTIFY_FIELD_NUMBER: _ClassVar[int]
    SIVAL_PTR_FIELD_NUMBER: _ClassVar[int]
    OVERRUN_FIELD_NUMBER: _ClassVar[int]
    ISEC_FIELD_NUMBER: _ClassVar[int]
    INSEC_FIELD_NUMBER: _ClassVar[int]
    VSEC_FIELD_NUMBER: _ClassVar[int]
    VNSEC_FIELD_NUMBER: _ClassVar[int]
    NOTIFY_THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    it_id: int
    clock_id: int
    si_signo: int
    it_sigev_notify: int
    sival_ptr: int
    overrun: int
    isec: int
    insec: int
    vsec: int
    vnsec: int
    notify_thread_id: int
    def __init__(self, it_id: _Optional[int] = ..., clock_id: _Optional[int] = ..., si_signo: _Optional[int] = ..., it_sigev_notify: _Optional[int] = ..., sival_ptr: _Optional[int] = ..., overrun: _Optional[int] = ..., isec: _Optional[int] = ..., insec: _Optional[int] = ..., vsec: _Optional[int] = ..., vnsec: _Optional[int] = ..., notify_thread_id: _Optional[int] = ...) -> None: ...

class task_timers_entry(_message.Message):
    __slots__ = ("real", "virt", "prof", "posix")
    REAL_FIELD_NUMBER: _ClassVar[int]
    VIRT_FIELD_NUMBER: _ClassVar[int]
    PROF_FIELD_NUMBER: _ClassVar[int]
    POSIX_FIELD_NUMBER: _ClassVar[int]
    real: itimer_entry
    virt: itimer_entry
    prof: itimer_entry
    posix: _containers.RepeatedCompositeFieldContainer[posix_timer_entry]
    def __init__(self, real: _Optional[_Union[itimer_entry, _Mapping]] = ..., virt: _Optional[_Union[itimer_entry, _Mapping]] = ..., prof: _Optional[_Union[itimer_entry, _Mapping]] = ..., posix: _Optional[_Iterable[_Union[posix_timer_entry, _Mapping]]] = ...) -> None: ...
