"""The Memory request on real CPU worker groups (torchrun + gloo): every rank's figures, trimming,
the figures the owner keeps from loads and forwards, and a group that is gone.

On the CPU there is no caching allocator: allocated and reserved are 0 and device is -1, but the
parameter bytes each rank holds and the count of trims are real, so these tests see the request
reach every rank and the trim run there. The GPU figures (reserved before and after a trim on the
GPU ComfyUI shares) are checked as numbers in test_memory.py.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from comfyui_xdit_usp.parallel import WorkerError, WorkerGroup, XDitUSPConfig
from comfyui_xdit_usp.parallel import tiny
from comfyui_xdit_usp.parallel.launcher import CUDA_ALLOC_ENV, allocator_env
from procs import wait_gone


def cpu_config(**kw) -> XDitUSPConfig:
    kw.setdefault("launch_timeout_s", 120)
    kw.setdefault("forward_timeout_s", 120)
    return XDitUSPConfig(world_size=2, device="cpu", dtype="fp32", **kw)


def test_memory_per_rank_trim_and_the_figures_the_owner_keeps(checkpoints):
    path, _ = checkpoints["t2v"]
    kw = tiny.random_inputs("t2v", 2, 2, 8, 8, seed=3)
    with WorkerGroup(cpu_config(weight_sharding="fsdp")) as group:
        group.start()
        empty = group.memory()
        assert [s.rank for s in empty] == [0, 1]
        assert all((s.device, s.allocated, s.reserved, s.param_bytes) == (-1, 0, 0, 0) for s in empty)

        info = group.load("m", path)
        # the load reply carries each rank's figures (after the load's own trim): kept, no request
        stats = group.memory_stats
        assert [s.param_bytes for s in stats] == info.param_bytes_per_rank
        assert info.param_bytes_per_rank[0] != info.param_bytes_per_rank[1]  # fsdp: each rank its own rows
        assert all(s.trims == empty[s.rank].trims + 1 for s in stats)
        assert info.memory is None  # per-rank figures live in memory_stats, not in the model's record
        assert info.peak_estimate > info.param_bytes  # planned at the model's standard size: activations

        base = group.forward("m", kw)
        assert group.forward_peaks["m"] == [None, None]  # no CUDA peak on the CPU
        assert group.memory_stats is not None and [s.param_bytes for s in group.memory_stats] == info.param_bytes_per_rank

        plain = group.memory()
        assert [s.trims for s in plain] == [s.trims for s in stats]  # reading does not trim
        trimmed = group.memory(trim=True)
        assert [s.trims for s in trimmed] == [s.trims + 1 for s in plain]
        assert [s.param_bytes for s in trimmed] == info.param_bytes_per_rank  # a trim frees no weight
        assert group.memory_stats == trimmed
        assert torch.equal(group.forward("m", kw), base)  # and the model is as it was
        assert group.launches == 1 and group.alive

        group.unload("m")
        assert group.memory_stats is None  # stale after an unload: asked again when needed
        assert [s.param_bytes for s in group.memory()] == [0, 0]


def test_memory_of_a_dead_or_closed_group_raises_worker_error(checkpoints):
    group = WorkerGroup(cpu_config())
    group.load("m", checkpoints["t2v"][0])
    assert group.memory_stats is not None
    os.kill(group.pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1") as e:
        group.memory(trim=True)
    assert time.monotonic() - t0 < 30
    assert e.value.rank == 1
    assert not group.alive and group.memory_stats is None and group.models == {}
    assert wait_gone(group.log_dir) == []
    with pytest.raises(WorkerError, match="not running"):
        group.memory()


def test_workers_get_expandable_segments_on_cuda_unless_the_user_chose():
    cuda = XDitUSPConfig(world_size=2, device="cuda")
    assert allocator_env(cuda, {}) == CUDA_ALLOC_ENV == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert allocator_env(cuda, {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}) == {}
    assert allocator_env(cpu_config(), {}) == {}
