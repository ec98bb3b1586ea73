"""core.memory: the command line keeps freed memory for the next array (glibc). Checked in a fresh
interpreter through glibc's own count of mapped blocks (mallinfo2's hblks): a large array is a
mapped block by default and a heap block once the command line has started."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")

PROBE = textwrap.dedent("""
    import ctypes, numpy as np
    libc = ctypes.CDLL("libc.so.6")
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                         "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = MallInfo2
    def mapped_for_a_new_array():
        before = libc.mallinfo2().hblks
        a = np.ones(64 << 20, np.uint8)  # 64 MB
        return libc.mallinfo2().hblks - before
    print(mapped_for_a_new_array())
    {setup}
    print("after:", mapped_for_a_new_array())
""")


def _probe(setup: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], capture_output=True, text=True, timeout=120)
    if "mallinfo2" in out.stderr:
        pytest.skip("glibc older than 2.33 (no mallinfo2)")
    assert out.returncode == 0, out.stderr
    first, rest = out.stdout.split("\n", 1)
    return [int(first), int(rest.rsplit("after:", 1)[1])]


def test_keep_freed_memory_serves_large_arrays_from_the_heap():
    assert _probe("from SpineKneeSegLib.core.memory import keep_freed_memory; assert keep_freed_memory()") == [1, 0]


def test_the_command_line_sets_it_and_a_plain_import_does_not():
    assert _probe("from SpineKneeSegLib import cli; assert cli.main(['tasks']) == 0") == [1, 0]
    assert _probe("from SpineKneeSegLib import cli; import SpineKneeSegLib.engine.pipeline") == [1, 1]


def test_the_training_loop_sets_it():
    training = str(REPO_ROOT / "Training")
    setup = (f"import sys; sys.path.insert(0, {training!r}); import torch, trainloop as tl; "
             "net = torch.nn.Linear(2, 1); opt = torch.optim.SGD(net.parameters(), 0.1); "
             "batches = iter(lambda: torch.ones(4, 2), None); "
             "tl.run_loop(net, opt, batches, lambda n, x: n(x).sum(), tl.LoopConfig(steps=1, tensorboard=False), None, "
             "save_best=None, log=lambda m: None)")
    assert _probe(setup) == [1, 0]


def test_imports_done_leaves_a_collector_it_did_not_pause_alone():
    """The Slicer panel and tests never pause the collector: the pipeline's imports_done() must
    neither freeze their heap nor switch their collector on or off."""
    import gc

    from SpineKneeSegLib.core.memory import imports_done

    enabled, frozen = gc.isenabled(), gc.get_freeze_count()
    imports_done()
    assert (gc.isenabled(), gc.get_freeze_count()) == (enabled, frozen)
