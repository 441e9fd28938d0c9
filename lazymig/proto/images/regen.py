"""Regenerate (or check) the ``*_pb2.py``/``*_pb2.pyi`` modules from the ``.proto`` files.

Usage, from the repository root with the test extras installed (grpcio-tools)::

    python -m lazymig.proto.images.regen            # rewrite the generated modules
    python -m lazymig.proto.images.regen --check    # exit 1 if they drifted

The ``.proto`` files import each other as ``lazymig/proto/images/<name>.proto``
and are compiled with the directory that holds the ``lazymig`` package as the
only include path, so protoc emits absolute imports
(``from lazymig.proto.images import vma_pb2``) and descriptor file names that
cannot clash with another copy of CRIU's schema (pycriu's) in the same process.

The drift check is semantic: it compares the ``FileDescriptorProto`` embedded in
each generated module with the one protoc produces now from the ``.proto``
(``--descriptor_set_out``), so a different grpcio-tools version that formats the
Python differently does not count as drift.

This is a development tool: it needs ``grpcio-tools``, which lazymig does not
need at run time.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import descriptor_pb2

__all__ = [
    "PACKAGE_DIR",
    "compile_descriptor_set",
    "drift",
    "generated_module_name",
    "main",
    "proto_files",
    "regenerate",
]

PACKAGE_DIR = Path(__file__).resolve().parent
"""The directory holding the ``.proto`` files and the generated modules."""

_INCLUDE_ROOT = PACKAGE_DIR.parents[2]  # holds the top-level ``lazymig`` package
_PACKAGE = "lazymig.proto.images"


def proto_files() -> list[Path]:
    """The ``.proto`` files of the package, sorted by name."""
    return sorted(PACKAGE_DIR.glob("*.proto"))


def generated_module_name(proto: Path | str) -> str:
    """The dotted module protoc generates for *proto* (``core-x86.proto`` -> ``..core_x86_pb2``)."""
    stem = Path(proto).name.removesuffix(".proto")
    return f"{_PACKAGE}.{stem.replace('-', '_')}_pb2"


def _protoc(args: Sequence[str]) -> None:
    try:
        protoc = importlib.import_module("grpc_tools.protoc")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("grpcio-tools is needed: pip install 'lazymig[test]'") from exc
    argv = ["grpc_tools.protoc", f"-I{_INCLUDE_ROOT}", *args]
    argv += [str(p.relative_to(_INCLUDE_ROOT)) for p in proto_files()]
    rc = protoc.main(argv)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(argv)}")


def compile_descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """Compile the ``.proto`` files now and return their descriptors (no source info)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "images.pb"
        _protoc([f"--descriptor_set_out={out}"])
        fds = descriptor_pb2.FileDescriptorSet()
        fds.ParseFromString(out.read_bytes())
    return fds


def _normalized(fdp: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """A copy without what protoc derives or adds only for some outputs.

    ``--descriptor_set_out`` fills in ``json_name`` (derived from the field
    name); the Python generator leaves it out. Source info is never compared.
    """
    out = descriptor_pb2.FileDescriptorProto()
    out.CopyFrom(fdp)
    out.ClearField("source_code_info")

    def strip(msg: descriptor_pb2.DescriptorProto) -> None:
        for field in [*msg.field, *msg.extension]:
            field.ClearField("json_name")
        for nested in msg.nested_type:
            strip(nested)

    for msg in out.message_type:
        strip(msg)
    for ext in out.extension:
        ext.ClearField("json_name")
    return out


def drift() -> list[str]:
    """Differences between the generated modules and the ``.proto`` files (empty: in sync)."""
    problems: list[str] = []
    compiled = {f.name: f for f in compile_descriptor_set().file}
    expected_modules = set()
    for name, fdp in sorted(compiled.items()):
        modname = generated_module_name(name)
        expected_modules.add(modname.rsplit(".", 1)[1])
        try:
            module = importlib.import_module(modname)
        except Exception as exc:  # a stale module may fail in many ways
            problems.append(f"{name}: cannot import {modname}: {exc!r}")
            continue
        embedded = descriptor_pb2.FileDescriptorProto()
        embedded.ParseFromString(module.DESCRIPTOR.serialized_pb)
        if _normalized(embedded) != _normalized(fdp):
            problems.append(f"{name}: {modname} was generated from a different schema")
        if not (PACKAGE_DIR / f"{modname.rsplit('.', 1)[1]}.pyi").is_file():
            problems.append(f"{name}: {modname}.pyi is missing")
    for path in sorted(PACKAGE_DIR.glob("*_pb2.py")):
        if path.stem not in expected_modules:
            problems.append(f"{path.name}: generated module without a .proto file")
    return problems


_PYI_PRELUDE = (
    "# mypy: ignore-errors\n"
    "# (added by lazymig.proto.images.regen: protoc's stubs use bare generics, and CRIU's\n"
    "# schema names some fields like their enum type, e.g. `lsmtype lsmtype`.)\n"
)


def regenerate() -> list[Path]:
    """Rewrite the generated modules from the ``.proto`` files; return the files written.

    Generated modules whose ``.proto`` file is gone are deleted. The stubs get
    a ``# mypy: ignore-errors`` line: they are type information for callers,
    not code to check.
    """
    expected = {generated_module_name(p).rsplit(".", 1)[1] for p in proto_files()}
    for path in [*PACKAGE_DIR.glob("*_pb2.py"), *PACKAGE_DIR.glob("*_pb2.pyi")]:
        if path.stem not in expected:
            path.unlink()
    _protoc([f"--python_out={_INCLUDE_ROOT}", f"--pyi_out={_INCLUDE_ROOT}"])
    for stub in PACKAGE_DIR.glob("*_pb2.pyi"):
        stub.write_text(_PYI_PRELUDE + stub.read_text())
    return sorted([*PACKAGE_DIR.glob("*_pb2.py"), *PACKAGE_DIR.glob("*_pb2.pyi")])


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m lazymig.proto.images.regen",
                                     description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true",
                        help="do not write anything; exit 1 if the generated modules drifted")
    args = parser.parse_args(argv)
    if args.check:
        problems = drift()
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    for path in regenerate():
        print(path.relative_to(_INCLUDE_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
