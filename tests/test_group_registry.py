"""The launcher's group registry (what the ComfyUI nodes use), on real torchrun + gloo groups on the CPU.

One group per set of devices: starting the group of a config closes every other group sharing a
device with it; a failed load closes its group unless other models live on it; idle groups close
on request. Processes are counted in the real process table.
"""
from __future__ import annotations

import pytest

from comfyui_xdit_usp.parallel import WorkerError, XDitUSPConfig, launcher, tiny
from procs import wait_worker_processes, worker_processes


def cpu_config(**kw) -> XDitUSPConfig:
    return XDitUSPConfig(**{**dict(world_size=2, device="cpu", dtype="fp32", launch_timeout_s=120, load_timeout_s=120),
                            **kw})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny.write_original_checkpoint(tiny.build_model("t2v", seed=0),
                                          tmp_path_factory.mktemp("ckpt") / "t2v.safetensors")


@pytest.fixture(autouse=True)
def no_groups_left():
    yield
    launcher.close_all_groups()
    assert wait_worker_processes(0) == []


def running():
    return [g for g in launcher.registered_groups() if g.alive]


def test_new_config_on_the_same_devices_closes_the_old_group(checkpoint):
    fp32, bf16 = cpu_config(), cpu_config(dtype="bf16")
    evicted = []
    counts = []
    for cfg in (fp32, bf16, fp32):
        info = launcher.load_model(cfg, "m", checkpoint, on_evict=lambda g: evicted.append((g.config, set(g.models))))
        assert info.variant == "t2v"
        assert running() == [launcher.find_group(cfg)]
        counts.append(worker_processes())
    assert len(counts[0]) >= 3 and [len(c) for c in counts] == [len(counts[0])] * 3  # agent + ranks, flat
    assert not set(counts[0]) & set(counts[1]) and not set(counts[1]) & set(counts[2])
    assert evicted == [(fp32, {"m"}), (bf16, {"m"})]  # told before the close, with what it held
    assert launcher.registered_groups() == [launcher.find_group(fp32)]  # the closed group was dropped
    # loading again on the running group starts nothing and closes nothing
    group = launcher.find_group(fp32)
    launcher.load_model(fp32, "m2", checkpoint, on_evict=evicted.append)
    assert group.launches == 1 and set(group.models) == {"m", "m2"} and len(evicted) == 2


def test_groups_share_devices_by_device_type_and_gpu_ids():
    share = launcher.shares_devices
    gpus = lambda *ids: XDitUSPConfig(world_size=len(ids), device="cuda", device_ids=list(ids))  # noqa: E731
    assert share(gpus(0, 1), gpus(1, 2)) and share(gpus(0, 1), XDitUSPConfig(world_size=2, device="cuda"))
    assert not share(gpus(0, 1), gpus(2, 3))
    assert not share(gpus(0, 1), cpu_config())
    assert share(cpu_config(), cpu_config(world_size=1, cfg_degree=1))  # CPU groups share the CPU


def test_failed_load_closes_its_group(checkpoint):
    # every rank raises: the group itself is healthy and would otherwise keep running, empty
    cfg = cpu_config(extra_env={"XDIT_USP_FAULT": "load_raise@0,load_raise@1"})
    with pytest.raises(WorkerError, match="injected fault load_raise"):
        launcher.load_model(cfg, "m", checkpoint)
    assert launcher.find_group(cfg) is None and launcher.registered_groups() == []
    assert wait_worker_processes(0) == []
    # a load that fails before any launch leaves no registered group either
    with pytest.raises(FileNotFoundError):
        launcher.load_model(cpu_config(), "m", checkpoint + ".missing")
    assert launcher.registered_groups() == []


def test_failed_load_keeps_a_group_that_holds_other_models(checkpoint, tmp_path):
    truncated = tmp_path / "truncated.safetensors"  # a download cut short
    data = open(checkpoint, "rb").read()
    truncated.write_bytes(data[: len(data) - 4096])
    cfg = cpu_config()
    launcher.load_model(cfg, "good", checkpoint)
    group = launcher.find_group(cfg)
    procs = worker_processes()
    with pytest.raises(ValueError, match="truncated"):
        launcher.load_model(cfg, "bad", str(truncated))
    assert launcher.find_group(cfg) is group and group.alive and set(group.models) == {"good"}
    assert worker_processes() == procs
    kw = tiny.random_inputs("t2v", 1, 2, 8, 8)  # and it still serves the model it holds
    assert group.forward("good", kw).shape == kw.hidden_states.shape


def test_close_idle_groups_closes_only_groups_without_models(checkpoint):
    cfg = cpu_config()
    launcher.load_model(cfg, "m", checkpoint)
    group = launcher.find_group(cfg)
    assert launcher.close_idle_groups() == [] and group.alive
    group.unload("m")
    assert launcher.close_idle_groups() == [group]
    assert not group.alive and launcher.registered_groups() == []
    assert wait_worker_processes(0) == []
    launcher.load_model(cfg, "m", checkpoint)  # the next load starts a new group
    assert launcher.find_group(cfg) is not group and launcher.find_group(cfg).alive
