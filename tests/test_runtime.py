"""ddpm.runtime.keep_freed_memory: large tensors freed and allocated again stop costing page faults (each
case in a fresh process: the setting is process-wide)."""

import json
import os
import subprocess
import sys

import pytest

_PROBE = """
import json, resource, sys, torch
from ddpm.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(int(sys.argv[2])):  # activations of 40-96 MB made, written and freed again, as every sampling step does
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    xs = [torch.ones(mb << 18) for mb in (40, 64, 48, 96)]
    ys = [x * 2 for x in xs]
    del xs, ys
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(mode: str, steps: int = 8, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode, str(steps)], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_is_reused_without_page_faults():
    plain = _probe("plain")
    kept = _probe("keep")
    assert kept["applied"] and not plain["applied"], (plain, kept)
    pages = 2 * (40 + 64 + 48 + 96) * 256  # 4 kB pages written per step
    # glibc's default maps blocks above 32 MB afresh every time: a fault per page, every step
    assert min(plain["faults"]) > 0.9 * pages, plain
    # kept: the first step faults its pages in, the later ones mostly reuse them (measured: the next seven
    # steps 10-41k faults together alone, 90k once beside a second test worker, against 889k by default; the
    # heap's placement of aligned blocks moves a little)
    assert kept["faults"][0] > 0.9 * pages and sum(kept["faults"][1:]) < 0.2 * sum(plain["faults"][1:]), kept


def test_it_can_be_turned_off():
    assert not _probe("keep", 0, DDPM_KEEP_FREED_MEMORY="0")["applied"]  # whether it applied: no steps needed
    assert not _probe("keep", 0, GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")["applied"]


def test_the_default_batch_size_follows_the_image_size_and_the_threads():
    from ddpm.runtime import default_batch_size

    assert default_batch_size(8 * 8, "cpu", threads=2) == 256  # digits: 1.38x the img-steps/s of batch 64
    assert [default_batch_size(r * r, "cpu", threads=2) for r in (28, 32, 256)] == [64, 64, 64]
    assert default_batch_size(8 * 8, "cpu", threads=16) == 1024 and default_batch_size(28 * 28, "cpu", threads=16) == 128
    assert [default_batch_size(r * r, "cuda") for r in (8, 32, 64, 256)] == [256, 256, 64, 64]
