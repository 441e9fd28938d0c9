# mypy: ignore-errors
# (added by lazymig.proto.images.regen: protoc's stubs use bare generics, and CRIU's
# schema names some fields like their enum type, e.g. `lsmtype lsmtype`.)
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class fh_entry(_message.Message):
    __slots__ = ("bytes", "type", "handle", "path", "mnt_id")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MNT_ID_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    type: int
    handle: _containers.RepeatedScalarFieldContainer[int]
    path: str
    mnt_id: int
    def __init__(self, bytes: _Optional[int] = ..., type: _Optional[int] = ..., handle: _Optional[_Iterable[int]] = ..., path: _Optional[str] = ..., mnt_id: _Optional[int] = ...) -> None: ...
