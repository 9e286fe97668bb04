"""fleet.malloc: a streaming process keeps large freed blocks for reuse (glibc)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_the_thresholds_once_per_process():
    code = ("from fleet.malloc import keep_freed_memory, _done\n"
            "assert not _done\n"
            "assert keep_freed_memory() and keep_freed_memory()\n"
            "import fleet.malloc as m\n"
            "assert m._done\n")
    subprocess.run([sys.executable, "-c", code], check=True)  # its own process: the thresholds are process-wide

