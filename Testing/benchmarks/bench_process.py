"""The process set-up every pipeline benchmark shares with the command line (core/memory.py): freed
memory kept for the next array, and the garbage collector paused until the first run's imports are
done, then frozen. Each has a flag to leave it out, for A/B figures."""
from __future__ import annotations

import argparse

from SpineKneeSegLib.core.memory import keep_freed_memory, pause_collection


def add_process_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's allocator as it is (the command line keeps freed memory: core/memory.py)")
    parser.add_argument("--plain-gc", action="store_true",
                        help="leave the garbage collector as it is (the command line freezes what its imports made: "
                             "core/memory.py)")


def set_up_process(args: argparse.Namespace) -> None:
    """As the command line does, but for what the flags leave out."""
    if not args.system_malloc:
        keep_freed_memory()
    if not args.plain_gc:
        pause_collection()
