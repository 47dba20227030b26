"""trainer.cpu_allocator (lsp.selfplay.runtime.configure_cpu_allocator): what each mode makes glibc
do with a large block, checked in a fresh process per mode (malloc settings are process-wide)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lsp.selfplay.runtime import configure_cpu_allocator

# Allocates a block larger than any mmap threshold glibc uses (32 MiB at most) after setting the
# mode, and prints how many mapped blocks (mallinfo2().hblks) that one allocation added.
PROBE = """
import ctypes, sys
from lsp.selfplay.runtime import configure_cpu_allocator
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
taken = configure_cpu_allocator(sys.argv[1])
before = libc.mallinfo2().hblks
block = libc.malloc(64 << 20)
print(taken, libc.mallinfo2().hblks - before)
libc.free(ctypes.c_void_p(block))
"""

glibc_only = pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc settings")


def _probe(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@glibc_only
@pytest.mark.parametrize("mode, taken, mapped", [
    ("heap", "True", 0),  # served from the heap: no mapping
    ("keep", "True", 1),  # over the 32 MiB threshold: still mapped per allocation
    ("system", "False", 1),  # glibc's defaults: mapped
])
def test_a_64_mib_block_is_mapped_only_outside_heap_mode(mode, taken, mapped):
    assert _probe(mode) == (taken, mapped)


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        configure_cpu_allocator("tcmalloc")
