# mypy: ignore-errors
# (added by lazymig.proto.images.regen: protoc's stubs use bare generics, and CRIU's
# schema names some fields like their enum type, e.g. `lsmtype lsmtype`.)
from lazymig.proto.images import core_pb2 as _core_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class lsmtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NO_LSM: _ClassVar[lsmtype]
    SELINUX: _ClassVar[lsmtype]
    APPARMOR: _ClassVar[lsmtype]
NO_LSM: lsmtype
SELINUX: lsmtype
APPARMOR: lsmtype

class inventory_entry(_message.Message):
    __slots__ = ("img_version", "fdinfo_per_id", "root_ids", "ns_per_id", "root_cg_set", "lsmtype", "dump_uptime", "pre_dump_mode", "tcp_close", "network_lock_method", "dump_criu_run_id", "allow_uprobes")
    IMG_VERSION_FIELD_NUMBER: _ClassVar[int]
    FDINFO_PER_ID_FIELD_NUMBER: _ClassVar[int]
    ROOT_IDS_FIELD_NUMBER: _ClassVar[int]
    NS_PER_ID_FIELD_NUMBER: _ClassVar[int]
    ROOT_CG_SET_FIELD_NUMBER: _ClassVar[int]
    LSMTYPE_FIELD_NUMBER: _ClassVar[int]
    DUMP_UPTIME_FIELD_NUMBER: _ClassVar[int]
    PRE_DUMP_MODE_FIELD_NUMBER: _ClassVar[int]
    TCP_CLOSE_FIELD_NUMBER: _ClassVar[int]
    NETWORK_LOCK_METHOD_FIELD_NUMBER: _ClassVar[int]
    DUMP_CRIU_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOW_UPROBES_FIELD_NUMBER: _ClassVar[int]
    img_version: int
    fdinfo_per_id: bool
    root_ids: _core_pb2.task_kobj_ids_entry
    ns_per_id: bool
    root_cg_set: int
    lsmtype: lsmtype
    dump_uptime: int
    pre_dump_mode: int
    tcp_close: bool
    network_lock_method: int
    dump_criu_run_id: str
    allow_uprobes: bool
    def __init__(self, img_version: _Optional[int] = ..., fdinfo_per_id: _Optional[bool] = ..., root_ids: _Optional[_Union[_core_pb2.task_kobj_ids_entry, _Mapping]] = ..., ns_per_id: _Optional[bool] = ..., root_cg_set: _Optional[int] = ..., lsmtype: _Optional[_Union[lsmtype, str]] = ..., dump_uptime: _Optional[int] = ..., pre_dump_mode: _Optional[int] = ..., tcp_close: _Optional[bool] = ..., network_lock_method: _Optional[int] = ..., dump_criu_run_id: _Optional[str] = ..., allow_uprobes: _Optional[bool] = ...) -> None: ...
