# mypy: ignore-errors
# (added by lazymig.proto.images.regen: protoc's stubs use bare generics, and CRIU's
# schema names some fields like their enum type, e.g. `lsmtype lsmtype`.)
from lazymig.proto.images import fh_pb2 as _fh_pb2
from lazymig.proto.images import fown_pb2 as _fown_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class inotify_wd_entry(_message.Message):
    __slots__ = ("id", "i_ino", "mask", "ignored_mask", "s_dev", "wd", "f_handle")
    ID_FIELD_NUMBER: _ClassVar[int]
    I_INO_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    IGNORED_MASK_FIELD_NUMBER: _ClassVar[int]
    S_DEV_FIELD_NUMBER: _ClassVar[int]
    WD_FIELD_NUMBER: _ClassVar[int]
    F_HANDLE_FIELD_NUMBER: _ClassVar[int]
    id: int
    i_ino: int
    mask: int
    ignored_mask: int
    s_dev: int
    wd: int
    f_handle: _fh_pb2.fh_entry
    def __init__(self, id: _Optional[int] = ..., i_ino: _Optional[int] = ..., mask: _Optional[int] = ..., ignored_mask: _Optional[int] = ..., s_dev: _Optional[int] = ..., wd: _Optional[int] = ..., f_handle: _Optional[_Union[_fh_pb2.fh_entry, _Mapping]] = ...) -> None: ...

class inotify_file_entry(_message.Message):
    __slots__ = ("id", "flags", "fown", "wd")
    ID_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    FOWN_FIELD_NUMBER: _ClassVar[int]
    WD_FIELD_NUMBER: _ClassVar[int]
    id: int
    flags: int
    fown: _fown_pb2.fown_entry
    wd: _containers.RepeatedCompositeFieldContainer[inotify_wd_entry]
    def __init__(self, id: _Optional[int] = ..., flags: _Optional[int] = ..., fown: _Optional[_Union[_fown_pb2.fown_entry, _Mapping]] = ..., wd: _Optional[_Iterable[_Union[inotify_wd_entry, _Mapping]]] = ...) -> None: ...
