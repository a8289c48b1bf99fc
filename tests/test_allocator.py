"""glibc malloc settings of ``aoe fit`` on CPU, checked in fresh processes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the setting applies to glibc only"
)

# Free a 64 MiB tensor, then allocate a 32 MiB one, as consecutive steps of differently sized activations would.
# The program prints whether the setting changed and the page faults of the second allocation. A fresh mapping
# faults in all 8192 of its 4 KiB pages, and reused memory none.
PROGRAM = """
import resource, sys, torch
from aoe_lightning.allocator import reuse_freed_memory
changed = reuse_freed_memory() if sys.argv[1] == "reuse" else False
tensor = torch.ones(16 * 2**20)
del tensor
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
tensor = torch.ones(8 * 2**20)
print(changed, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run_program(mode: str, **env: str) -> tuple[str, int]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("MALLOC_", "GLIBC_"))}
    environment.pop("LD_PRELOAD", None)
    result = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True,
                            env=environment | env)
    changed, faults = result.stdout.split()
    return changed, int(faults)


def test_reuse_avoids_page_faults():
    changed, faults = run_program("reuse")
    default_changed, default_faults = run_program("default")

    assert changed == "True"
    assert default_changed == "False"
    assert default_faults > 8_000
    assert faults < 500


def test_reuse_respects_user_tunables():
    changed, _ = run_program("reuse", MALLOC_TRIM_THRESHOLD_="1048576")

    assert changed == "False"
