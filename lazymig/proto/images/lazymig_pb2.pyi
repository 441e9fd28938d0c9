# mypy: ignore-errors
# (added by lazymig.proto.images.regen: protoc's stubs use bare generics, and CRIU's
# schema names some fields like their enum type, e.g. `lsmtype lsmtype`.)
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class lazymig_file_entry(_message.Message):
    __slots__ = ("id", "path", "deleted", "dev", "inode", "size", "mtime_ns")
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    DEV_FIELD_NUMBER: _ClassVar[int]
    INODE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MTIME_NS_FIELD_NUMBER: _ClassVar[int]
    id: int
    path: str
    deleted: bool
    dev: int
    inode: int
    size: int
    mtime_ns: int
    def __init__(self, id: _Optional[int] = ..., path: _Optional[str] = ..., deleted: _Optional[bool] = ..., dev: _Optional[int] = ..., inode: _Optional[int] = ..., size: _Optional[int] = ..., mtime_ns: _Optional[int] = ...) -> None: ...

class lazymig_xstate_component(_message.Message):
    __slots__ = ("feature", "offset", "size")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    feature: int
    offset: int
    size: int
    def __init__(self, feature: _Optional[int] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class lazymig_thread_entry(_message.Message):
    __slots__ = ("tid", "xstate", "rseq_flags")
    TID_FIELD_NUMBER: _ClassVar[int]
    XSTATE_FIELD_NUMBER: _ClassVar[int]
    RSEQ_FLAGS_FIELD_NUMBER: _ClassVar[int]
    tid: int
    xstate: bytes
    rseq_flags: int
    def __init__(self, tid: _Optional[int] = ..., xstate: _Optional[bytes] = ..., rseq_flags: _Optional[int] = ...) -> None: ...

class lazymig_external_file(_message.Message):
    __slots__ = ("file_id", "name")
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    file_id: int
    name: str
    def __init__(self, file_id: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class lazymig_task_entry(_message.Message):
    __slots__ = ("pid", "version", "threads", "files", "xfeatures", "xstate_layout", "cwd", "root", "umask", "job_stopped", "lazy_pages", "external_files")
    PID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    XFEATURES_FIELD_NUMBER: _ClassVar[int]
    XSTATE_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    UMASK_FIELD_NUMBER: _ClassVar[int]
    JOB_STOPPED_FIELD_NUMBER: _ClassVar[int]
    LAZY_PAGES_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_FILES_FIELD_NUMBER: _ClassVar[int]
    pid: int
    version: str
    threads: _containers.RepeatedCompositeFieldContainer[lazymig_thread_entry]
    files: _containers.RepeatedCompositeFieldContainer[lazymig_file_entry]
    xfeatures: int
    xstate_layout: _containers.RepeatedCompositeFieldContainer[lazymig_xstate_component]
    cwd: str
    root: str
    umask: int
    job_stopped: bool
    lazy_pages: bool
    external_files: _containers.RepeatedCompositeFieldContainer[lazymig_external_file]
    def __init__(self, pid: _Optional[int] = ..., version: _Optional[str] = ..., threads: _Optional[_Iterable[_Union[lazymig_thread_entry, _Mapping]]] = ..., files: _Optional[_Iterable[_Union[lazymig_file_entry, _Mapping]]] = ..., xfeatures: _Optional[int] = ..., xstate_layout: _Optional[_Iterable[_Union[lazymig_xstate_component, _Mapping]]] = ..., cwd: _Optional[str] = ..., root: _Optional[str] = ..., umask: _Optional[int] = ..., job_stopped: _Optional[bool] = ..., lazy_pages: _Optional[bool] = ..., external_files: _Optional[_Iterable[_Union[lazymig_external_file, _Mapping]]] = ...) -> None: ...
