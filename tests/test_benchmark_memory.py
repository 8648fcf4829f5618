"""benchmarks/step_time.py's CPU peak memory: the peak of live tensor bytes, from torch.profiler's allocations."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"
MB = 1_000_000


@pytest.fixture(scope="module")
def step_time():
    spec = importlib.util.spec_from_file_location("step_time", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def profiled(fn):
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with prof:
        fn()
    return prof


def test_peak_is_the_most_bytes_alive_at_once_not_the_sum_of_allocations(step_time):
    before = torch.ones(MB // 4)  # allocated before profiling: its free is not counted against the peak

    def work():
        nonlocal before
        a = torch.ones(MB // 4)  # 1 MB
        b = torch.ones(2 * MB // 4)  # 3 MB alive
        del a  # 2 MB
        c = torch.ones(4 * MB // 4)  # 6 MB alive: the peak
        del b, c
        d = torch.ones(5 * MB // 4)  # 5 MB alive, after the peak
        del d, before

    peak = step_time.peak_allocated_during(profiled(work))
    assert 6 * MB <= peak < 6 * MB + 4096  # the sum of allocations is 12 MB; small scalars may add a few bytes


def test_no_allocation_is_an_error_not_a_zero(step_time):
    x = torch.ones(4)
    with pytest.raises(RuntimeError, match="no CPU allocation"):
        step_time.peak_allocated_during(profiled(x.zero_))  # an op that allocates nothing
