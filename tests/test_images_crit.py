"""Peer checks against Debian's crit (CRIU 3.17): it reads what lazymig writes and vice versa.

crit 3.17 predates CRIU 4.2's pagemap field 5, so it shows the page count of
field 2 (``nr_pages`` in its schema, ``compat_nr_pages`` in ours). ``crit info``
is broken in 3.17 and not used.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.message import Message

from lazymig.proto.constants import PE
from lazymig.proto.images import (
    ImagesDir,
    InventoryEntry,
    PagemapEntry,
    PstreeEntry,
    TaskKobjIdsEntry,
    inventory_pb2,
    regen,
)

sys.path.insert(0, str(Path(__file__).parent))
from helpers import CRIT, crit_decode, mm_entry, plain, vma, x86_core

pytestmark = [
    pytest.mark.crit,
    pytest.mark.skipif(CRIT is None, reason="crit is not installed (Debian package criu)"),
]


def crit_encode(image: dict[str, Any], path: Path) -> None:
    assert CRIT is not None
    subprocess.run([CRIT, "encode", "-o", str(path)], input=json.dumps(image).encode(),
                   check=True, capture_output=True, timeout=60)


# -- crit decodes what lazymig writes -----------------------------------------------------


def test_crit_decodes_inventory(tmp_path: Path) -> None:
    d = ImagesDir(tmp_path)
    inv = InventoryEntry(img_version=2, fdinfo_per_id=True, ns_per_id=True, root_cg_set=1,
                         root_ids=TaskKobjIdsEntry(vm_id=1, files_id=2, fs_id=3, sighand_id=4,
                                                   pid_ns_id=5, net_ns_id=6),
                         lsmtype=inventory_pb2.APPARMOR, dump_uptime=123456789,
                         dump_criu_run_id="3f0c-new-in-criu-4", allow_uprobes=True)
    d.write_inventory(inv)
    decoded = crit_decode(tmp_path / "inventory.img")
    want = plain(inv)
    del want["dump_criu_run_id"], want["allow_uprobes"]  # newer than crit 3.17
    assert decoded == {"magic": "INVENTORY", "entries": [want]}


def test_crit_decodes_pstree(tmp_path: Path) -> None:
    tree = [PstreeEntry(pid=100, ppid=1, pgid=100, sid=50, threads=[100, 101, 102]),
            PstreeEntry(pid=4_000_000, ppid=100, pgid=100, sid=50, threads=[4_000_000])]
    ImagesDir(tmp_path).write_pstree(tree)
    assert crit_decode(tmp_path / "pstree.img") == {
        "magic": "PSTREE", "entries": [plain(e) for e in tree]}


def test_crit_decodes_mm(tmp_path: Path) -> None:
    mm = mm_entry([vma(0x400000, 0x401000, prot=5, flags=0x2, status=0x41, shmid=9, fd=-1),
                   vma(0x7FFF_FFFD_E000, 0x7FFF_FFFF_F000, status=0x203, madv=0x10000,
                       fdflags=0o2)])
    ImagesDir(tmp_path).write_mm(7, mm)
    assert crit_decode(tmp_path / "mm-7.img") == {"magic": "MM", "entries": [plain(mm)]}
    pretty = crit_decode(tmp_path / "mm-7.img", pretty=True)["entries"][0]["vmas"][1]
    assert pretty["start"] == "0x7ffffffde000"
    assert pretty["status"] == "VMA_AREA_REGULAR | VMA_AREA_STACK | VMA_ANON_PRIVATE"


def test_crit_decodes_core(tmp_path: Path) -> None:
    core = x86_core("worker-∂")
    core.thread_core.signals_p.signals.add(siginfo=bytes(range(128)))
    core.tc.blk_sigset_extended = 0xFFFF_0000
    ImagesDir(tmp_path).write_core(4242, core)
    assert crit_decode(tmp_path / "core-4242.img") == {"magic": "CORE", "entries": [plain(core)]}
    gpregs = crit_decode(tmp_path / "core-4242.img", pretty=True)["entries"][0]["thread_info"]
    assert gpregs["gpregs"]["ip"] == "0x7f00deadbeef"


def test_crit_decodes_pagemap(tmp_path: Path) -> None:
    entries = [PagemapEntry(0x400000, 3, PE.PRESENT),
               PagemapEntry(0x1000_0000_0000, 0xFFFF_FFFF, PE.LAZY | PE.PRESENT),
               PagemapEntry(0x2000_0000_0000, 2**32 + 7, PE.LAZY),  # too big for field 2
               PagemapEntry(0x7FFF_0000_0000, 2, PE.PARENT)]
    ImagesDir(tmp_path).write_pagemap(3, 0x10001, entries)
    decoded = crit_decode(tmp_path / "pagemap-3.img")
    assert decoded == {"magic": "PAGEMAP", "entries": [
        {"pages_id": 0x10001},
        {"vaddr": 0x400000, "nr_pages": 3, "flags": 4},
        {"vaddr": 0x1000_0000_0000, "nr_pages": 0xFFFF_FFFF, "flags": 6},
        {"vaddr": 0x2000_0000_0000, "nr_pages": 0, "flags": 2},
        {"vaddr": 0x7FFF_0000_0000, "nr_pages": 2, "flags": 1},
    ]}
    pretty = crit_decode(tmp_path / "pagemap-3.img", pretty=True)["entries"]
    assert pretty[2] == {"vaddr": "0x100000000000", "nr_pages": 0xFFFF_FFFF,
                         "flags": "PE_LAZY | PE_PRESENT"}


# -- lazymig reads what crit encodes ------------------------------------------------------


def test_lazymig_reads_crit_pagemap(tmp_path: Path) -> None:
    crit_encode({"magic": "PAGEMAP", "entries": [
        {"pages_id": 5},
        {"vaddr": "0x400000", "nr_pages": 2, "flags": "PE_PRESENT"},
        {"vaddr": "0x600000", "nr_pages": 16, "flags": "PE_LAZY | PE_PRESENT"},
        {"vaddr": "0x700000", "nr_pages": 4, "flags": "PE_LAZY"},
        {"vaddr": "0x800000", "nr_pages": 1},                      # legacy: PRESENT
        {"vaddr": "0x900000", "nr_pages": 3, "in_parent": True},   # legacy: PARENT
    ]}, tmp_path / "pagemap-9.img")
    d = ImagesDir(tmp_path)
    assert d.pagemap(9) == (5, [
        PagemapEntry(0x400000, 2, PE.PRESENT),
        PagemapEntry(0x600000, 16, PE.LAZY | PE.PRESENT),
        PagemapEntry(0x700000, 4, PE.LAZY),
        PagemapEntry(0x800000, 1, PE.PRESENT),
        PagemapEntry(0x900000, 3, PE.PARENT),
    ])
    crit_encode({"magic": "MM", "entries": [plain(mm_entry([
        vma(0x600000, 0x604000), vma(0x604000, 0x700000), vma(0x700000, 0x702000)]))]},
        tmp_path / "mm-9.img")
    assert d.lazy_ranges(9) == [(0x600000, 4), (0x604000, 12), (0x700000, 2)]
    assert d.find_pages(9, 0x800000) == (tmp_path / "pages-5.img", 18 * 4096)


def test_lazymig_reads_crit_images(tmp_path: Path) -> None:
    core = x86_core()
    mm = mm_entry([vma(0x1000, 0x3000, flags=0x22, status=0x201)])
    tree = [PstreeEntry(pid=1, ppid=0, pgid=1, sid=1, threads=[1, 2])]
    inv = InventoryEntry(img_version=2, fdinfo_per_id=True, lsmtype=inventory_pb2.SELINUX)
    images: list[tuple[str, str, list[Message]]] = [
        ("CORE", "core-1.img", [core]), ("MM", "mm-1.img", [mm]),
        ("PSTREE", "pstree.img", list(tree)), ("INVENTORY", "inventory.img", [inv])]
    for magic, name, entries in images:
        crit_encode({"magic": magic, "entries": [plain(e) for e in entries]}, tmp_path / name)
    d = ImagesDir(tmp_path)
    assert d.core(1) == core
    assert d.mm(1) == mm
    assert d.pstree() == tree
    assert d.inventory() == inv


def test_crit_and_lazymig_write_identical_bytes(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    ImagesDir(ours).write_core(1, x86_core())
    ImagesDir(ours).write_mm(1, mm_entry([vma(0x1000, 0x3000)]))
    for name in ["core-1.img", "mm-1.img"]:
        crit_encode(crit_decode(ours / name), theirs / name)
        assert (theirs / name).read_bytes() == (ours / name).read_bytes()


# -- the schema agrees with crit's own ----------------------------------------------------

# Fields CRIU added after 3.17, so crit's schema cannot know them.
_NEWER_THAN_CRIT = {("pagemap_entry", 5), ("inventory_entry", 13), ("inventory_entry", 14)}
# Fields CRIU renamed since 3.17.
_RENAMED = {("pagemap_entry", 2): ("nr_pages", "compat_nr_pages")}

_DUMP_PYCRIU_SCHEMA = """
import sys
from google.protobuf import descriptor_pb2
from pycriu.images import pb  # imports every *_pb2 module
fds = descriptor_pb2.FileDescriptorSet()
for name, mod in sorted(sys.modules.items()):
    if name.startswith("pycriu.images.") and name.endswith("_pb2"):
        mod.DESCRIPTOR.CopyToProto(fds.file.add())
sys.stdout.buffer.write(fds.SerializeToString())
"""


def _messages(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, descriptor_pb2.DescriptorProto]:
    out: dict[str, descriptor_pb2.DescriptorProto] = {}

    def add(msg: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        out[prefix + msg.name] = msg
        for nested in msg.nested_type:
            add(nested, prefix + msg.name + ".")

    for f in fds.file:
        for msg in f.message_type:
            add(msg, "")
    return out


def _enums(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, set[tuple[str, int]]]:
    out: dict[str, set[tuple[str, int]]] = {}
    for f in fds.file:
        for enum in f.enum_type:
            out[enum.name] = {(v.name, v.number) for v in enum.value}
    for name, msg in _messages(fds).items():
        for enum in msg.enum_type:
            out[f"{name}.{enum.name}"] = {(v.name, v.number) for v in enum.value}
    return out


def test_schema_matches_crits(tmp_path: Path) -> None:
    assert CRIT is not None
    interpreter = Path(CRIT).read_text().splitlines()[0].removeprefix("#!").split()
    proc = subprocess.run([*interpreter, "-c", _DUMP_PYCRIU_SCHEMA], check=False,
                          capture_output=True, timeout=60)
    if proc.returncode:
        pytest.skip(f"cannot load crit's pycriu schema: {proc.stderr.decode()[-300:]}")
    theirs_fds = descriptor_pb2.FileDescriptorSet()
    theirs_fds.ParseFromString(proc.stdout)
    theirs = _messages(theirs_fds)
    ours = _messages(regen.compile_descriptor_set())
    assert {"pagemap_entry", "core_entry", "thread_info_x86", "mm_entry"} <= ours.keys()
    checked = 0
    for name, msg in ours.items():
        if name.startswith("lazymig_"):  # lazymig's own image (lazymig.proto)
            continue
        assert name in theirs, f"{name} is not a CRIU message"
        their_fields = {f.number: f for f in theirs[name].field}
        for field in msg.field:
            if (name, field.number) in _NEWER_THAN_CRIT:
                assert field.number not in their_fields
                continue
            other = their_fields.get(field.number)
            assert other is not None, f"{name}.{field.name} = {field.number} unknown to CRIU"
            names = _RENAMED.get((name, field.number), (other.name, other.name))
            assert (other.name, field.name) == names, f"{name} field {field.number}"
            assert (field.type, field.label) == (other.type, other.label), \
                f"{name}.{field.name} differs from CRIU's"
            if field.type_name:
                assert field.type_name.rsplit(".", 1)[-1] == other.type_name.rsplit(".", 1)[-1]
            if field.HasField("default_value") or other.HasField("default_value"):
                assert field.default_value == other.default_value
            checked += 1
        required = {f.number for f in theirs[name].field
                    if f.label == descriptor_pb2.FieldDescriptorProto.LABEL_REQUIRED}
        assert required <= {f.number for f in msg.field}, f"{name} lacks a required field"
    assert checked > 150
    ours_enums, their_enums = _enums(regen.compile_descriptor_set()), _enums(theirs_fds)
    want = {"core_entry.march", "lsmtype", "seccomp_mode", "user_x86_regs_mode"}
    assert want <= ours_enums.keys()
    for name, values in ours_enums.items():
        assert values <= their_enums[name], f"enum {name} differs from CRIU's"
