# mypy: ignore-errors
# (added by lazymig.proto.images.regen: protoc's stubs use bare generics, and CRIU's
# schema names some fields like their enum type, e.g. `lsmtype lsmtype`.)
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class file_lock_entry(_message.Message):
    __slots__ = ("flag", "type", "pid", "fd", "start", "len")
    FLAG_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    LEN_FIELD_NUMBER: _ClassVar[int]
    flag: int
    type: int
    pid: int
    fd: int
    start: int
    len: int
    def __init__(self, flag: _Optional[int] = ..., type: _Optional[int] = ..., pid: _Optional[int] = ..., fd: _Optional[int] = ..., start: _Optional[int] = ..., len: _Optional[int] = ...) -> None: ...
