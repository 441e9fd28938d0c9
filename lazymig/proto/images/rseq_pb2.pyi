# mypy: ignore-errors
# (added by lazymig.proto.images.regen: protoc's stubs use bare generics, and CRIU's
# schema names some fields like their enum type, e.g. `lsmtype lsmtype`.)
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class rseq_entry(_message.Message):
    __slots__ = ("rseq_abi_pointer", "rseq_abi_size", "signature", "rseq_cs_pointer")
    RSEQ_ABI_POINTER_FIELD_NUMBER: _ClassVar[int]
    RSEQ_ABI_SIZE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    RSEQ_CS_POINTER_FIELD_NUMBER: _ClassVar[int]
    rseq_abi_pointer: int
    rseq_abi_size: int
    signature: int
    rseq_cs_pointer: int
    def __init__(self, rseq_abi_pointer: _Optional[int] = ..., rseq_abi_size: _Optional[int] = ..., signature: _Optional[int] = ..., rseq_cs_pointer: _Optional[int] = ...) -> None: ...
