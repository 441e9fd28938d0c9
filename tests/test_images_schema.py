"""The committed ``*_pb2`` modules match the ``.proto`` files, and the schema is CRIU's."""

from __future__ import annotations

import importlib

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from lazymig.proto.images import (
    core_pb2,
    core_x86_pb2,
    inventory_pb2,
    mm_pb2,
    pagemap_pb2,
    pstree_pb2,
    regen,
    vma_pb2,
)

pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools (test extra) compiles the .proto")


def test_generated_modules_match_the_proto_files() -> None:
    problems = regen.drift()
    assert problems == [], (
        "generated modules drifted from the .proto files; run "
        "`python -m lazymig.proto.images.regen`:\n" + "\n".join(problems)
    )


def test_every_proto_has_a_module_and_a_stub() -> None:
    names = {p.name for p in regen.proto_files()}
    assert {"inventory.proto", "pstree.proto", "mm.proto", "vma.proto", "pagemap.proto",
            "core.proto", "core-x86.proto", "sa.proto", "fs.proto", "creds.proto",
            "lazymig.proto"} <= names
    for proto in regen.proto_files():
        modname = regen.generated_module_name(proto)
        importlib.import_module(modname)
        assert (regen.PACKAGE_DIR / (modname.rsplit(".", 1)[1] + ".pyi")).is_file()


def test_drift_check_notices_a_changed_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    real = regen.compile_descriptor_set()

    def changed() -> descriptor_pb2.FileDescriptorSet:
        fds = descriptor_pb2.FileDescriptorSet()
        fds.CopyFrom(real)
        for f in fds.file:
            if f.name.endswith("/pagemap.proto"):
                entry = next(m for m in f.message_type if m.name == "pagemap_entry")
                next(fl for fl in entry.field if fl.name == "nr_pages").number = 6
        return fds

    monkeypatch.setattr(regen, "compile_descriptor_set", changed)
    problems = regen.drift()
    assert len(problems) == 1 and "pagemap.proto" in problems[0]


def test_drift_check_ignores_json_names_and_source_info() -> None:
    fdp = descriptor_pb2.FileDescriptorProto()
    pagemap_pb2.DESCRIPTOR.CopyToProto(fdp)
    noisy = descriptor_pb2.FileDescriptorProto()
    noisy.CopyFrom(fdp)
    noisy.message_type[1].field[0].json_name = "vaddr"
    noisy.source_code_info.location.add().path.append(4)
    assert regen._normalized(noisy) == regen._normalized(fdp)


def test_check_command_exit_status() -> None:
    assert regen.main(["--check"]) == 0


_U64 = FieldDescriptor.TYPE_UINT64
_U32 = FieldDescriptor.TYPE_UINT32
_S64 = FieldDescriptor.TYPE_SINT64
_REQ, _OPT = "required", "optional"

# (message, field) -> (number, type, label), from CRIU's images/*.proto.
_CRIU_FIELDS: dict[tuple[type[Message], str], tuple[int, int, str]] = {
    (pagemap_pb2.pagemap_head, "pages_id"): (1, _U32, _REQ),
    (pagemap_pb2.pagemap_entry, "vaddr"): (1, _U64, _REQ),
    (pagemap_pb2.pagemap_entry, "compat_nr_pages"): (2, _U32, _REQ),
    (pagemap_pb2.pagemap_entry, "in_parent"): (3, FieldDescriptor.TYPE_BOOL, _OPT),
    (pagemap_pb2.pagemap_entry, "flags"): (4, _U32, _OPT),
    (pagemap_pb2.pagemap_entry, "nr_pages"): (5, _U64, _OPT),
    (inventory_pb2.inventory_entry, "img_version"): (1, _U32, _REQ),
    (inventory_pb2.inventory_entry, "fdinfo_per_id"): (2, FieldDescriptor.TYPE_BOOL, _OPT),
    (inventory_pb2.inventory_entry, "dump_uptime"): (8, _U64, _OPT),
    (pstree_pb2.pstree_entry, "threads"): (5, _U32, "repeated"),
    (mm_pb2.mm_entry, "vmas"): (14, FieldDescriptor.TYPE_MESSAGE, "repeated"),
    (mm_pb2.mm_entry, "exe_file_id"): (12, _U32, _REQ),
    (vma_pb2.vma_entry, "status"): (7, _U32, _REQ),
    (vma_pb2.vma_entry, "fd"): (8, _S64, _REQ),
    (vma_pb2.vma_entry, "madv"): (9, _U64, _OPT),
    (core_pb2.core_entry, "mtype"): (1, FieldDescriptor.TYPE_ENUM, _REQ),
    (core_pb2.core_entry, "thread_info"): (2, FieldDescriptor.TYPE_MESSAGE, _OPT),
    (core_pb2.core_entry, "tc"): (3, FieldDescriptor.TYPE_MESSAGE, _OPT),
    (core_pb2.core_entry, "thread_core"): (5, FieldDescriptor.TYPE_MESSAGE, _OPT),
    (core_pb2.task_core_entry, "sigactions"): (15, FieldDescriptor.TYPE_MESSAGE, "repeated"),
    (core_x86_pb2.user_x86_regs_entry, "gs"): (27, _U64, _REQ),
    (core_x86_pb2.user_x86_fpregs_entry, "xsave"): (13, FieldDescriptor.TYPE_MESSAGE, _OPT),
}


@pytest.mark.parametrize(("key", "want"), list(_CRIU_FIELDS.items()),
                         ids=[f"{m.DESCRIPTOR.name}.{f}" for m, f in _CRIU_FIELDS])
def test_key_fields_have_criu_numbers_and_types(key: tuple[type[Message], str],
                                                want: tuple[int, int, str]) -> None:
    message, name = key
    field = message.DESCRIPTOR.fields_by_name[name]
    label = "repeated" if field.is_repeated else _REQ if field.is_required else _OPT
    assert (field.number, field.type, label) == want
