# mypy: ignore-errors
# (added by lazymig.proto.images.regen: protoc's stubs use bare generics, and CRIU's
# schema names some fields like their enum type, e.g. `lsmtype lsmtype`.)
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class siginfo_entry(_message.Message):
    __slots__ = ("siginfo",)
    SIGINFO_FIELD_NUMBER: _ClassVar[int]
    siginfo: bytes
    def __init__(self, siginfo: _Optional[bytes] = ...) -> None: ...

class signal_queue_entry(_message.Message):
    __slots__ = ("signals",)
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    signals: _containers.RepeatedCompositeFieldContainer[siginfo_entry]
    def __init__(self, signals: _Optional[_Iterable[_Union[siginfo_entry, _Mapping]]] = ...) -> None: ...
