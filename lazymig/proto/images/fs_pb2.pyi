# mypy: ignore-errors
# (added by lazymig.proto.images.regen: protoc's stubs use bare generics, and CRIU's
# schema names some fields like their enum type, e.g. `lsmtype lsmtype`.)
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class fs_entry(_message.Message):
    __slots__ = ("cwd_id", "root_id", "umask")
    CWD_ID_FIELD_NUMBER: _ClassVar[int]
    ROOT_ID_FIELD_NUMBER: _ClassVar[int]
    UMASK_FIELD_NUMBER: _ClassVar[int]
    cwd_id: int
    root_id: int
    umask: int
    def __init__(self, cwd_id: _Optional[int] = ..., root_id: _Optional[int] = ..., umask: _Optional[int] = ...) -> None: ...
