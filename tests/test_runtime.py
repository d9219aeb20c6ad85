"""The runtime on CPU: real torchrun + gloo worker groups against a single-process diffusers forward.

One group per layout serves every variant (loaded by key) at two sizes: 32 tokens (divides by
every world size used) and 45 tokens (divides by none, so padding is exercised).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from comfyui_xdit_usp.parallel import Layout, WorkerError, WorkerGroup, XDitUSPConfig
from comfyui_xdit_usp.parallel import tiny
from comfyui_xdit_usp.parallel.tiny import rel_err
from comfyui_xdit_usp.parallel.protocol import WeightPatch
from procs import group_processes, wait_gone
from workflow_utils import BIND_PACK

SIZES = {"divisible": (2, 8, 8), "padded": (3, 6, 10)}  # latent (frames, h, w) -> 32 and 45 tokens
LAYOUTS = {  # name: (ulysses, ring, cfg)
    "single": (1, 1, 1),
    "ulysses2": (2, 1, 1),
    "ring2": (1, 2, 1),
    "ulysses2xring2": (2, 2, 1),
    "cfg2xulysses2": (2, 1, 2),
}
TOL = 1e-5


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """(path, model) of a 4-head T2V model (dim 512): Ulysses 2 leaves each rank 2 heads, so the
    overlapped exchange really splits into head groups (the tiny models have 2 heads)."""
    cfg = {**tiny.tiny_config("t2v"), "num_attention_heads": 4}
    model = tiny.model_class("t2v")(**cfg)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    path = tmp_path_factory.mktemp("wide") / "wide.safetensors"
    return tiny.write_original_checkpoint(model.eval(), path), model.eval()


@pytest.fixture(scope="module")
def references(checkpoints, wide):
    refs = {}
    for v, (_, model) in [*checkpoints.items(), ("wide", wide)]:
        for size_name, size in SIZES.items():
            kw = tiny.random_inputs("t2v" if v == "wide" else v, 2, *size, seed=7)
            refs[v, size_name] = (kw, tiny.reference_forward(model, kw))
    return refs


def cpu_config(ulysses=0, ring=0, cfg=0, world=None, **kw) -> XDitUSPConfig:
    world = world or max(1, ulysses) * max(1, ring) * max(1, cfg)
    kw.setdefault("launch_timeout_s", 120)
    kw.setdefault("forward_timeout_s", 120)
    kw.setdefault("dtype", "fp32")
    return XDitUSPConfig(world_size=world, ulysses_degree=ulysses, ring_degree=ring, cfg_degree=cfg,
                         device="cpu", **kw)


# Blocks do their per-token work in pieces of this many tokens (sp_wan._block_forward), so that
# the pieces, a short last one and per-token modulation (TI2V) are all exercised; the other tests
# keep the default, one piece at these sizes.
SMALL_PIECES = {"XDIT_USP_BLOCK_CHUNK_TOKENS": "5"}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parity_every_variant(layout, checkpoints, wide, references):
    """Every layout, with the exchange overlapped by head groups (the default): the 4-head model
    splits 2 (Ulysses) or 4 (ring) ways."""
    u, r, c = LAYOUTS[layout]
    with WorkerGroup(cpu_config(u, r, c, extra_env=SMALL_PIECES)) as group:
        for v, (path, _) in checkpoints.items():
            info = group.load(v, path)
            assert info.variant == v
        assert info.layout == Layout(c, u, r)
        # comm_overlap "auto" overlaps on the CPU (on GPUs: below 40 GB/s, test_cost_model_choices)
        assert info.layout_choice == {"rule": "configured", **({"comm_overlap": True} if u * r * c > 1 else {})}
        link = info.link  # the link probe, measured at the first load
        assert link["world"] == u * r * c and link["ms"] > 0 and link["matmul_tflops"] > 0
        assert (link["a2a_gbps"] > 0 and link["p2p_gbps"] > 0 and 0 <= link["overlap"] <= 1) == (link["world"] > 1)
        assert group.load("wide", wide[0]).num_heads == 4
        errors = {}
        for (v, size_name), (kw, ref) in references.items():
            stats = {}
            out = group.forward(v, kw, stats=stats)
            assert out.shape == ref.shape
            assert stats["layout"] == Layout(c, u, r)  # batch 2 takes the cfg split
            errors[v, size_name] = rel_err(out, ref)
        assert group.launches == 1
    worst = max(errors, key=errors.get)
    print(f"{layout}: worst max rel err {errors[worst]:.2e} at {worst}")
    assert all(e <= TOL for e in errors.values()), errors


def test_batch_that_cfg_cannot_split_runs_on_all_ranks(checkpoints):
    """... with the blocking exchange (comm_overlap off: yunchang's all-to-all and ring loop)."""
    path, model = checkpoints["t2v"]
    kw = tiny.random_inputs("t2v", 1, *SIZES["padded"], seed=3)
    ref = tiny.reference_forward(model, kw)
    with WorkerGroup(cpu_config(2, 1, 2, comm_overlap=False)) as group:  # a saved boolean reads as "off"
        info = group.load("m", path)
        assert info.layout_choice["comm_overlap"] is False
        stats = {}
        out = group.forward("m", kw, stats=stats)
    assert info.fallback_layout == Layout(cfg=1, ulysses=2, ring=2)
    assert stats["layout"] == info.fallback_layout
    assert rel_err(out, ref) <= TOL


def test_warm_group_is_reused_and_holds_two_experts(checkpoints):
    (p1, m1), (p2, m2) = checkpoints["t2v"], checkpoints["i2v"]
    kw1 = tiny.random_inputs("t2v", 2, *SIZES["padded"])
    kw2 = tiny.random_inputs("i2v", 2, *SIZES["padded"])
    with WorkerGroup(cpu_config(2)) as group:
        group.load("high", p1)
        pids = list(group.pids)
        a = group.forward("high", kw1)
        group.load("low", p2)
        b = group.forward("low", kw2)
        a2 = group.forward("high", kw1)
        assert group.launches == 1 and group.pids == pids
        assert torch.equal(a, a2)
        assert rel_err(a, tiny.reference_forward(m1, kw1)) <= TOL
        assert rel_err(b, tiny.reference_forward(m2, kw2)) <= TOL
        group.unload("high")
        with pytest.raises(KeyError, match="high"):
            group.forward("high", kw1)


def test_lora_merged_on_workers_and_strength_change_needs_no_reload(checkpoints):
    path, model = checkpoints["t2v"]
    kw = tiny.random_inputs("t2v", 2, *SIZES["padded"])
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(512, 4, generator=g) * 0.5, torch.randn(4, 256, generator=g) * 0.5
    name = "blocks.1.ffn.net.0.proj.weight"
    with WorkerGroup(cpu_config(2)) as group:
        group.load("m", path)
        base = group.forward("m", kw)
        results = {}
        for strength in (1.0, 0.5):
            group.set_weight_patches("m", {name: [WeightPatch("lora", [up, down], strength)]})
            results[strength] = group.forward("m", kw)
        group.set_weight_patches("m", {})
        restored = group.forward("m", kw)
        assert group.launches == 1
    for strength, out in results.items():
        ref = tiny.reference_forward(tiny.patched_model(model, {name: strength * up @ down}), kw)
        assert rel_err(out, ref) <= TOL
        assert rel_err(out, base) > 1e-3  # the LoRA really changes the output
    assert torch.equal(restored, base)


def test_compile_matches_the_reference(checkpoints, references):
    """compile=True: the blocks' per-token work through torch.compile (inductor, CPU) matches the
    single-process eager forward in two layouts (batch 2: cfg2; batch 1: its fallback, Ulysses 2),
    with FSDP, small pieces (a short last one) and per-token modulation (TI2V); LoRA weight updates
    are seen by the compiled graphs (parameters are graph inputs), never a stale compiled copy."""
    # the first forward of each shape compiles (tens of seconds a rank on a busy 2-core machine)
    config = cpu_config(world=2, compile=True, weight_sharding="fsdp", extra_env=SMALL_PIECES, forward_timeout_s=900)
    errors, layouts = {}, set()
    with WorkerGroup(config) as group:
        for v in ("t2v", "ti2v_5b"):
            path, model = checkpoints[v]
            info = group.load(v, path)
            assert info.compiled and info.placement == "fsdp"
            for size in SIZES:
                kw, ref = references[v, size]
                for rows in (slice(0, 2), slice(1, 2)):
                    stats = {}
                    one = dataclasses.replace(kw, **{k: t[rows] for k, t in kw.tensors().items()})
                    errors[v, size, rows.start] = rel_err(group.forward(v, one, stats=stats), ref[rows])
                    layouts.add(stats["layout"])
        path, model = checkpoints["t2v"]
        kw, base_ref = references["t2v", "padded"]
        name = "blocks.1.ffn.net.0.proj.weight"
        g = torch.Generator().manual_seed(5)
        up, down = torch.randn(512, 4, generator=g) * 0.5, torch.randn(4, 256, generator=g) * 0.5
        for strength in (1.0, 0.5):
            group.set_weight_patches("t2v", {name: [WeightPatch("lora", [up, down], strength)]})
            patched = tiny.patched_model(model, {name: strength * up @ down})
            out = group.forward("t2v", kw)
            errors[f"lora {strength}"] = rel_err(out, tiny.reference_forward(patched, kw))
            assert rel_err(out, base_ref) > 1e-3
        group.set_weight_patches("t2v", {})
        errors["lora removed"] = rel_err(group.forward("t2v", kw), base_ref)
    print(f"compile: {errors}")
    assert layouts == {Layout(2, 1, 1), Layout(1, 2, 1)}
    assert all(e <= TOL for e in errors.values()), errors


def test_fp8_matmul_multiplies_in_fp8(checkpoints, references):
    """fp8_matmul (ComfyUI's fp8_e4m3fn_fast): the blocks' Linears run torch._scaled_mm on e4m3
    weights and per-token e4m3 inputs. Not exact by design: against the fp32 reference its error is
    that of fp8 weights plus the inputs' rounding, and it differs from fp8 storage upcast to bf16."""
    path, model = checkpoints["t2v"]
    kw, ref = references["t2v", "padded"]
    name = "blocks.1.ffn.net.0.proj.weight"
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(512, 4, generator=g) * 0.5, torch.randn(4, 256, generator=g) * 0.5
    patched = tiny.patched_model(model, {name: up @ down})
    outs = {}
    for fast in (False, True):
        # fp8 matmuls with FSDP: the row scales are split with the weights' rows
        config = cpu_config(world=2, dtype="bf16", weight_dtype="fp8_e4m3fn", fp8_matmul=fast,
                            weight_sharding="fsdp" if fast else "none")
        with WorkerGroup(config) as group:
            info = group.load("m", path)
            assert info.fp8_matmul == fast and info.fp8_input_scaling == ("token" if fast else "")
            outs[fast] = group.forward("m", kw).float()
            if fast:  # a LoRA on a row-scaled fp8 weight: dequantised, patched, quantised with new scales
                group.set_weight_patches("m", {name: [WeightPatch("lora", [up, down], 1.0)]})
                lora_err = tiny.rel_l2(group.forward("m", kw).float(), tiny.reference_forward(patched, kw))
                group.set_weight_patches("m", {})
                restored = group.forward("m", kw).float()
    err = {fast: tiny.rel_l2(out, ref) for fast, out in outs.items()}
    print(f"fp8 storage vs fp32: {err[False]:.2e}; with fp8 matmuls: {err[True]:.2e}; "
          f"between them {tiny.rel_l2(outs[True], outs[False]):.2e}; with a LoRA {lora_err:.2e}")
    assert not torch.equal(outs[True], outs[False])  # the matmuls really ran in fp8
    assert err[True] < 0.1 and tiny.rel_l2(outs[True], outs[False]) < 0.05
    assert lora_err < 0.1
    assert torch.equal(restored, outs[True])  # the file's weights and row scales back, bit for bit


def test_config_errors_say_what_works():
    with pytest.raises(ValueError, match="40 heads: Ulysses 4 works, 3 does not"):
        XDitUSPConfig(world_size=12, ulysses_degree=3, ring_degree=4, cfg_degree=1, device="cpu").resolve(40)
    with pytest.raises(ValueError, match="must equal world_size 4"):
        XDitUSPConfig(world_size=4, ulysses_degree=3, device="cpu").validate()
    with pytest.raises(ValueError, match=r"2 GPU\(s\) requested but no CUDA device is visible"):
        XDitUSPConfig(world_size=2, device="cuda").validate(visible_gpus=0)
    with pytest.raises(ValueError, match="enable_activation_checkpointing=True is not implemented"):
        XDitUSPConfig.from_dict({"num_gpus": 2, "enable_activation_checkpointing": True, "device": "cpu"})
    with pytest.raises(ValueError, match="unknown keys"):
        XDitUSPConfig.from_dict({"num_gpu": 2})
    cfg = XDitUSPConfig.from_dict({"num_gpus": 2, "use_fp16": True, "gpu_memory_fraction": 0.9,
                                   "pipeline_parallel_size": 1, "device": "cpu"})
    assert cfg.world_size == 2 and cfg.dtype == "fp16"
    # the speed options that cannot run say so before launch
    with pytest.raises(ValueError, match="'sage' needs CUDA"):
        XDitUSPConfig(world_size=2, device="cpu", attention_backend="sage").plan(12)
    with pytest.raises(ValueError, match="fp8_matmul multiplies e4m3 weights"):
        XDitUSPConfig(world_size=2, device="cpu", fp8_matmul=True, weight_dtype="fp8_e5m2").validate()
    with pytest.raises(ValueError, match="comm_dtype='fp8' sends bf16/fp16 activations as fp8 between GPUs; it "
                                         "needs device='cuda'"):
        XDitUSPConfig(world_size=2, device="cpu", dtype="bf16", comm_dtype="fp8").validate()
    with pytest.raises(ValueError, match="comm_dtype='fp8'.*dtype='fp32'"):
        XDitUSPConfig(world_size=2, device="cuda", dtype="fp32", comm_dtype="fp8").validate(visible_gpus=2)
    with pytest.raises(ValueError, match="comm_dtype must be one of"):
        XDitUSPConfig(world_size=2, device="cpu", comm_dtype="int8").validate()
    with pytest.raises(ValueError, match="comm_overlap must be one of"):
        XDitUSPConfig(world_size=2, device="cpu", comm_overlap="sometimes").validate()
    with pytest.raises(ValueError, match="compile must be true or false"):
        XDitUSPConfig(world_size=2, device="cpu", compile="yes").validate()
    assert XDitUSPConfig(world_size=2, device="cpu", fp8_matmul=True).storage_weight_dtype == "fp8_e4m3fn"
    from comfyui_xdit_usp.parallel.attention import resolve_backend
    try:
        import sageattention  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the sageattention package"):
            resolve_backend("sage", "cuda", 1)
    else:  # no log-sum-exp: Ulysses yes, ring no
        with pytest.raises(ValueError, match="returns no log-sum-exp"):
            resolve_backend("sage", "cuda", 2)


@pytest.mark.parametrize("n,heads,expect", [
    (1, 12, "cfg1xulysses1xring1"), (2, 12, "cfg2xulysses1xring1"), (4, 12, "cfg2xulysses2xring1"),
    (8, 12, "cfg2xulysses4xring1"), (8, 40, "cfg2xulysses4xring1"), (6, 40, "cfg2xulysses1xring3"),
    (3, 40, "cfg1xulysses1xring3"), (8, 24, "cfg2xulysses4xring1"),
])
def test_auto_layout(n, heads, expect):
    cfg = XDitUSPConfig(world_size=n, device="cpu")
    layout = cfg.resolve(heads)
    assert str(layout) == expect
    fb = cfg.fallback_layout(heads)
    assert fb.cfg == 1 and fb.world_size == n and heads % fb.ulysses == 0


def test_layout_the_heads_cannot_take_fails_before_launch(checkpoints):
    group = WorkerGroup(cpu_config(4, 1, 1))  # the tiny model has 2 heads
    with pytest.raises(ValueError, match="2 heads: Ulysses 2 works, 4 does not"):
        group.load("m", checkpoints["t2v"][0])
    assert group.proc is None and group.launches == 0


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    group = WorkerGroup(cpu_config(2))
    with pytest.raises(ValueError, match="broken.safetensors"):
        group.load("m", str(bad))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        group.load("m", str(tmp_path / "nope.safetensors"))
    assert group.launches == 0


def test_rank_crashing_while_loading(checkpoints):
    group = WorkerGroup(cpu_config(2), env={"XDIT_USP_FAULT": "load_exit@1"})
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1") as e:
        group.load("m", checkpoints["t2v"][0])
    assert time.monotonic() - t0 < 60
    assert e.value.rank == 1
    assert not group.alive
    assert wait_gone(group.log_dir) == []


def test_rank_killed_mid_forward(checkpoints):
    group = WorkerGroup(cpu_config(2), env={"XDIT_USP_FAULT": "forward_sleep@0=60"})
    group.load("m", checkpoints["t2v"][0])
    victim = group.pids[1]
    threading.Timer(1.0, os.kill, (victim, signal.SIGKILL)).start()
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1") as e:
        group.forward("m", tiny.random_inputs("t2v", 2, *SIZES["padded"]))
    assert time.monotonic() - t0 < 30
    assert "restarts on the next run" in str(e.value)
    assert wait_gone(group.log_dir) == []
    # the next load relaunches a working group
    group.env = {}
    group.load("m", checkpoints["t2v"][0])
    assert group.launches == 2
    group.forward("m", tiny.random_inputs("t2v", 2, *SIZES["padded"]))
    group.close()
    assert wait_gone(group.log_dir) == []


def test_forward_timeout(checkpoints):
    group = WorkerGroup(cpu_config(2, forward_timeout_s=3), env={"XDIT_USP_FAULT": "forward_sleep@1=120"})
    group.load("m", checkpoints["t2v"][0])
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"timed out after 3s waiting for rank\(s\) \[(0, )?1\]"):
        group.forward("m", tiny.random_inputs("t2v", 2, *SIZES["padded"]))
    assert time.monotonic() - t0 < 20
    assert wait_gone(group.log_dir) == []


@pytest.mark.parametrize("first,later", [(0, 1), (1, 0)])
def test_the_rank_that_raised_first_is_blamed(first, later, checkpoints):
    # Both ranks raise, `later` one second after `first`: all answered, so the group stays usable,
    # and the error names `first` whatever order the replies arrive in.
    fault = f"load_raise@{first},load_raise@{later}=1"
    with WorkerGroup(cpu_config(2), env={"XDIT_USP_FAULT": fault}) as group:
        with pytest.raises(WorkerError, match=rf"rank {first} failed in 'load': RuntimeError: injected fault") as e:
            group.load("m", checkpoints["t2v"][0])
        assert e.value.rank == first
        assert "Traceback" in str(e.value) and "_maybe_fault" in str(e.value)
        assert f"then: rank {later} failed in 'load'" in str(e.value)
        assert group.alive
        assert [pong.rank for pong in group.ping()] == [0, 1]


def test_one_rank_raising_tears_the_group_down(checkpoints):
    # Rank 1 raises while rank 0 goes on into a collective: the group can't be trusted any more.
    group = WorkerGroup(cpu_config(2), env={"XDIT_USP_FAULT": "load_raise@1"})
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1 failed in 'load': RuntimeError: injected fault"):
        group.load("m", checkpoints["t2v"][0])
    assert time.monotonic() - t0 < 40
    assert not group.alive
    assert wait_gone(group.log_dir) == []


def test_bad_input_is_rejected_in_the_owner(checkpoints):
    with WorkerGroup(cpu_config(2)) as group:
        group.load("m", checkpoints["t2v"][0])
        kw = tiny.random_inputs("t2v", 2, *SIZES["padded"])
        kw = dataclasses.replace(kw, hidden_states=kw.hidden_states[:, :8])
        with pytest.raises(ValueError, match="8 channels but the t2v model takes 16"):
            group.forward("m", kw)
        assert group.alive


def test_no_worker_outlives_a_killed_owner(checkpoints, tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(BIND_PACK + textwrap.dedent(f"""
        import sys, time
        from comfyui_xdit_usp.parallel import WorkerGroup, XDitUSPConfig
        g = WorkerGroup(XDitUSPConfig(world_size=2, device="cpu", dtype="fp32"))
        g.load("m", {checkpoints['t2v'][0]!r})
        print(g.log_dir, flush=True)
        time.sleep(600)
    """))
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        log_dir = owner.stdout.readline().strip()
        assert log_dir, "owner did not start its group"

        assert len(group_processes(log_dir)) >= 3  # torchrun agent + 2 workers
        owner.kill()
        owner.wait(10)
        assert wait_gone(log_dir, timeout=20) == []
    finally:
        owner.kill()


_EXCHANGE_SCRIPT = """
import math, os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
from comfyui_xdit_usp.parallel.attention import CommOptions, build_sp_group, resolve_backend, usp_attention

def rank_main(rank, port, q, k, v, valid, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    backend = resolve_backend("cpu_flash", "cpu", 2)
    shard = slice(rank * q.shape[1] // 2, (rank + 1) * q.shape[1] // 2)
    out = {}
    for u, r in ((2, 1), (1, 2)):
        for name, comm in (("blocking", CommOptions(overlap=False)), ("overlap", CommOptions()),
                           ("fp8", CommOptions(wire="fp8"))):
            group = build_sp_group(1, u, r, comm=comm)
            out[u, name] = usp_attention(q[:, shard].clone(), k[:, shard].clone(), v[:, shard].clone(), group,
                                         backend, valid, 1 / math.sqrt(q.shape[-1]))
    results[rank] = out
    dist.destroy_process_group()

if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 24, 8, 16, generator=g) for _ in range(3))  # B, S, H, D: 4 head groups at Ulysses 2, 8 at ring 2
    valid = 19  # five padded keys
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k[:, :valid].transpose(1, 2), v[:, :valid].transpose(1, 2)).transpose(1, 2)
    results = mp.Manager().dict()
    mp.spawn(rank_main, args=(int(sys.argv[1]), q, k, v, valid, results), nprocs=2)
    for key in results[0]:
        out = torch.cat([results[0][key], results[1][key]], dim=1)
        blocking = torch.cat([results[0][key[0], "blocking"], results[1][key[0], "blocking"]], dim=1)
        err = (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()
        print(key[0], key[1], err, (torch.linalg.vector_norm(out - blocking) / torch.linalg.vector_norm(blocking)).item())
"""


def test_overlapped_exchange_is_the_blocking_one_and_fp8_wire_is_close(tmp_path):
    """The pipelined exchanges on 2 gloo ranks, without a model: Ulysses 2 (4 head groups of 1) and
    ring 2 (8 groups of 1) give the blocking path's output up to the kernel's rounding (bit for bit at
    Ulysses 2; the CPU kernel rounds a 1-head call slightly differently, ~1e-7); the fp8 wire (allowed here
    below the config, which refuses it on the CPU) stays within e4m3's rounding."""
    script = tmp_path / "exchange.py"
    script.write_text(BIND_PACK + "\n" + _EXCHANGE_SCRIPT)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, str(script), str(port)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {(int(u), name): (float(err), float(vs_blocking)) for u, name, err, vs_blocking in
            (line.split() for line in out.stdout.splitlines())}
    print(rows)
    assert len(rows) == 6
    for u in (1, 2):
        assert rows[u, "blocking"][0] <= TOL and rows[u, "overlap"][1] <= 1e-6, rows
        assert 1e-3 < rows[u, "fp8"][0] < 0.08, rows


# The cost model behind `auto` on GPUs: pure functions of a link probe and the model's shape.
def _probe(world, gbps, overlap):
    from comfyui_xdit_usp.parallel.linkprobe import LinkProbe
    return LinkProbe(world=world, a2a_gbps=gbps, p2p_gbps=gbps, latency_us=30, overlap=overlap, copy_gbps=3000,
                     matmul_tflops=700, attn_tflops=450, ms=50)


def test_cost_model_choices():
    from comfyui_xdit_usp.parallel.linkprobe import ModelShape, candidates, choose, overlap_for, predict
    s13, s14 = ModelShape(1536, 12, 8960, 30), ModelShape(5120, 40, 13824, 40)
    t480, t720 = 21 * 30 * 52, 21 * 45 * 80
    fast, host = _probe(2, 150, 1.0), _probe(2, 20, 0.0)  # NVLink-like; P2P off, transfers not hidden
    assert candidates(2, 12, 1) == [Layout(1, 2, 1), Layout(1, 1, 2)]
    assert candidates(2, 12, 1, ring_ok=False) == [Layout(1, 2, 1)]
    assert candidates(4, 12, 2)[0] == Layout(2, 2, 1) and Layout(1, 1, 4) in candidates(4, 12, 2)
    for shape, tokens in ((s13, t480), (s14, t720)):
        for probe in (fast, host):
            # batch 2: the CFG split exchanges nothing
            assert choose(shape, probe, 2, tokens)[0] == Layout(2, 1, 1)
            # batch 1 without a log-sum-exp kernel: Ulysses
            assert choose(shape, probe, 1, tokens, ring_ok=False)[0] == Layout(1, 2, 1)
            # where transfers hide, overlap predicts faster than the blocking exchange (where none hides, the
            # pipeline's extra calls only add their latency: 2% at most)
            for lay in candidates(2, shape.heads, 1):
                ovl, blk = (predict(lay, shape, probe, 1, tokens, overlap=o) for o in (True, False))
                assert ovl <= blk + 1e-9 if probe is fast else ovl < 1.03 * blk
    # a link whose transfers hide: ring 2's exchange hides behind attention, Ulysses' first and last groups cannot
    assert choose(s13, fast, 1, t480)[0] == Layout(1, 1, 2)
    # through host memory with nothing hidden, 4 GPUs: ring 4 sends twice Ulysses 4's bytes (measured 2.50x vs 1.57x)
    slow4 = _probe(4, 20, 0.0)
    layout, costs = choose(s13, slow4, 1, t480)
    assert layout.ring < 4 and costs["cfg1xulysses4xring1"] < costs["cfg1xulysses1xring4"]
    # comm_overlap "auto": overlapped below 40 GB/s (PCIe without P2P measured 11-23), blocking on NVLink (64-210)
    cuda = XDitUSPConfig(world_size=2)
    assert (overlap_for(cuda, host), overlap_for(cuda, fast), overlap_for(cuda, None)) == (True, False, True)
    # one slow all-to-all reading on NVLink (19.6 GB/s, its ring at 184: measured) keeps the blocking exchange
    assert overlap_for(cuda, dataclasses.replace(fast, a2a_gbps=19.6, p2p_gbps=184)) is False
    assert overlap_for(XDitUSPConfig(world_size=2, comm_overlap="on"), fast) is True
    assert overlap_for(XDitUSPConfig(world_size=2, comm_overlap=False), host) is False
    assert overlap_for(XDitUSPConfig(world_size=2, device="cpu"), fast) is True  # the CPU tests check that path
    # a slower link costs more; fp32 moves twice the bytes
    assert predict(Layout(1, 2, 1), s13, _probe(2, 10, 0.0), 1, t480) > predict(Layout(1, 2, 1), s13, host, 1, t480)
    assert predict(Layout(1, 2, 1), s13, host, 1, t480, itemsize=4) > predict(Layout(1, 2, 1), s13, host, 1, t480)
