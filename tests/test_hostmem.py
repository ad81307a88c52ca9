"""hostmem.tune_malloc: with it, glibc serves large blocks from its heap instead of fresh mmaps."""

import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, sys
from xllava_jax.hostmem import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.mallinfo2.restype = MallInfo2
applied = tune_malloc()
block = libc.malloc(96 << 20)
mapped = libc.mallinfo2().hblkhd          # bytes held in separately mmapped blocks
libc.free(block)
print(applied, mapped >= 96 << 20)
"""


def _probe(env_value):
    import os

    env = dict(os.environ)
    env.pop("XLLAVA_MALLOC", None)
    if env_value is not None:
        env["XLLAVA_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tuned_malloc_keeps_large_blocks_out_of_mmap_and_can_be_turned_off():
    assert _probe(None) == ["True", "False"]          # tuned: the 96 MiB block comes from the heap
    assert _probe("system") == ["False", "True"]      # glibc defaults: a fresh mmap


def test_model_commands_tune_the_allocator(monkeypatch):
    from xllava_jax import cli, hostmem

    calls = []
    monkeypatch.setattr(hostmem, "tune_malloc", lambda: calls.append(1) or True)
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert calls == []                                 # --help exits while parsing, before any tuning
    assert cli.main(["data", "check", "--corpus", "/nonexistent.json"]) == 2 and calls == []
    assert cli.main(["eval", "report", "--scores", "/nonexistent.json"]) == 2 and calls == [1]
