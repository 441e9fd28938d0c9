"""CPUID, for the layout of this CPU's XSAVE area (leaf 0xD).

The one place lazymig executes an instruction of its own: a small code page
called through ctypes, or the cpuid driver (``/dev/cpu/0/cpuid``, root only)
where no memory may be executable.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import struct
from collections.abc import Sequence
from typing import Final

from lazymig.proto.constants import PAGE_SIZE

__all__ = ["xstate_layout"]

# CPUID(eax=leaf, ecx=subleaf) for x86_64 SysV: (edi, esi, rdx=out[4]).
_CPUID_CODE: Final = bytes((
    0x53,                          # push rbx
    0x89, 0xF8,                    # mov eax, edi
    0x89, 0xF1,                    # mov ecx, esi
    0x49, 0x89, 0xD0,              # mov r8, rdx
    0x0F, 0xA2,                    # cpuid
    0x41, 0x89, 0x00,              # mov [r8], eax
    0x41, 0x89, 0x58, 0x04,        # mov [r8+4], ebx
    0x41, 0x89, 0x48, 0x08,        # mov [r8+8], ecx
    0x41, 0x89, 0x50, 0x0C,        # mov [r8+12], edx
    0x5B,                          # pop rbx
    0xC3,                          # ret
))
_XSTATE_MAX_FEATURE: Final = 19


def _cpuid_by_code(queries: Sequence[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """Execute CPUID for each (leaf, subleaf) from a small code page of our own."""
    page = mmap.mmap(-1, PAGE_SIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    try:
        page.write(_CPUID_CODE)
        code = (ctypes.c_char * PAGE_SIZE).from_buffer(page)
        try:
            fn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)(
                ctypes.addressof(code))
            out = (ctypes.c_uint32 * 4)()
            results = []
            for leaf, sub in queries:
                fn(leaf, sub, ctypes.addressof(out))
                results.append((out[0], out[1], out[2], out[3]))
            del fn
        finally:
            del code
    finally:
        page.close()
    return results


def _cpuid_by_device(queries: Sequence[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """CPUID through the cpuid driver (/dev/cpu/0/cpuid, root only)."""
    fd = os.open("/dev/cpu/0/cpuid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = []
        for leaf, sub in queries:
            a, b, c, d = struct.unpack("<4I", os.pread(fd, 16, leaf | (sub << 32)))
            out.append((a, b, c, d))
        return out
    finally:
        os.close(fd)


@functools.cache
def xstate_layout() -> dict[int, tuple[int, int]]:
    """``{state component: (offset, size)}`` of this CPU's standard-format XSAVE area.

    From CPUID leaf 0xD (the layout of the NT_X86_XSTATE regset), for the
    components 2 and up that the CPU has. Empty if CPUID could not be run
    (no executable memory and no /dev/cpu/0/cpuid).
    """
    queries = [(0xD, i) for i in range(2, _XSTATE_MAX_FEATURE)]
    try:
        results = _cpuid_by_code(queries)
    except OSError:
        try:
            results = _cpuid_by_device(queries)
        except OSError:
            return {}
    return {i: (ebx, eax) for (_, i), (eax, ebx, _, _) in zip(queries, results, strict=True)
            if eax}
