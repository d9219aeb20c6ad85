"""Tensor and pipeline parallelism on CPU: real torchrun + gloo groups against a single-process
diffusers forward (≤ 1e-5 in fp32), composed with the CFG split and Ulysses, at a token count (45)
that no rank count divides, with per-rank parameter bytes checked against the memory plan and each
rank's share of the stream between blocks checked (sequence ranks × tensor ranks split it).

Four groups cover the layouts: tp2 (every variant, LoRA on column- and row-parallel weights),
pp2×cfg2 (whose batch-1 fallback is pp2×Ulysses2), tp2×cfg2 (fallback tp2×Ulysses2, 4 heads) and
tp2×pp2 (the seed's example layout).
"""
from __future__ import annotations

import math

import pytest
import torch

from comfyui_xdit_usp.parallel import Layout, WorkerGroup, XDitUSPConfig, tiny
from comfyui_xdit_usp.parallel.config import ConfigError
from comfyui_xdit_usp.parallel.protocol import WeightPatch
from comfyui_xdit_usp.parallel.tiny import rel_err

SIZE = (3, 6, 10)  # latent (frames, h, w) -> 45 tokens
TOL = 1e-5
LAYERS = 6  # blocks enough that a 2-way split of them outweighs the replicated embedders (3 a stage at pp2)


def cpu_config(tensor=1, pipeline=1, ulysses=0, cfg=0, world=None, **kw) -> XDitUSPConfig:
    return XDitUSPConfig(world_size=world or tensor * pipeline * max(1, ulysses) * max(1, cfg), ulysses_degree=ulysses,
                         cfg_degree=cfg, tensor_parallel_degree=tensor, pipeline_parallel_degree=pipeline,
                         device="cpu", dtype="fp32", launch_timeout_s=120, forward_timeout_s=120, **kw)


@pytest.fixture(scope="module")
def split_checkpoints(tmp_path_factory):
    """{variant: (path, model)}: 2 heads, 6 blocks (VACE hints at blocks 0 and 3)."""
    d = tmp_path_factory.mktemp("split")
    out = {}
    for i, v in enumerate(tiny.VARIANTS):
        model = tiny.build_model(v, seed=20 + i, layers=LAYERS)
        out[v] = (tiny.write_original_checkpoint(model, d / f"{v}.safetensors"), model)
    return out


def check_loaded(info, model, share: float, layout: Layout):
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    assert info.placement == "split" and info.layout == layout
    assert info.param_bytes_total == full
    assert max(info.param_bytes_per_rank) == info.param_bytes <= share * full, (info.param_bytes_per_rank, full)
    plan = info.memory_plan  # the owner's count, from the header before the load, is what the ranks hold
    assert (plan["placement"], plan["weight_bytes"], plan["weight_bytes_per_rank"]) == ("split", full, info.param_bytes)


def run_forwards(group, key, model, variant, batches, expect_layouts=None):
    errors = {}
    for batch in batches:
        kw = tiny.random_inputs(variant, batch, *SIZE, seed=7 + batch)
        stats = {}
        out = group.forward(key, kw, stats=stats)
        ref = tiny.reference_forward(model, kw)
        assert out.shape == ref.shape
        if expect_layouts:
            assert stats["layout"] == expect_layouts[batch], (batch, stats["layout"])
        # the stream between blocks is sharded over sequence × tensor ranks (padded: 45 tokens)
        layout, tokens = stats["layout"], math.prod(s // p for s, p in zip(SIZE, model.config.patch_size))
        assert stats["stream_tokens"] == [-(-tokens // (layout.sp * layout.tensor))] * layout.world_size, stats
        errors[variant, batch] = rel_err(out, ref)
    return errors


def test_tensor_parallel_every_variant_and_lora(split_checkpoints):
    """tp2: each rank holds half of every head-split and FFN weight; every variant; a LoRA on a
    column-parallel weight (to_q: rows of `up`), one on a row-parallel weight (ffn.net.2: columns of
    `down`), a diff on a bias only tensor rank 0 holds; strength changed, removed exactly. Small
    block pieces, so a piece takes its tokens from every tensor rank's run (and a short last one)."""
    errors = {}
    # pieces of 12 tokens (sp_wan._block_forward): a rank's 23 in two, each gathered and reduce-scattered on its own
    with WorkerGroup(cpu_config(tensor=2, extra_env={"XDIT_USP_BLOCK_CHUNK_TOKENS": "12"})) as group:
        for v, (path, model) in split_checkpoints.items():
            check_loaded(group.load(v, path), model, 0.6, Layout(1, 1, 1, tensor=2))
            errors.update(run_forwards(group, v, model, v, (2, 1)))
        path, model = split_checkpoints["t2v"]
        kw = tiny.random_inputs("t2v", 2, *SIZE, seed=3)
        g = torch.Generator().manual_seed(5)
        q, ffn2, bias = "blocks.0.attn1.to_q.weight", "blocks.4.ffn.net.2.weight", "blocks.1.attn2.to_out.0.bias"
        up_q, down_q = torch.randn(256, 2, generator=g) * 0.5, torch.randn(2, 256, generator=g) * 0.5
        up_f, down_f = torch.randn(256, 3, generator=g) * 0.5, torch.randn(3, 512, generator=g) * 0.5
        diff = torch.randn(256, generator=g)
        base = group.forward("t2v", kw)
        for strength in (1.0, 0.5):
            group.set_weight_patches("t2v", {q: [WeightPatch("lora", [up_q, down_q], strength)],
                                             ffn2: [WeightPatch("lora", [up_f, down_f], strength)],
                                             bias: [WeightPatch("diff", [diff], strength)]})
            out = group.forward("t2v", kw)
            patched = tiny.patched_model(model, {q: strength * up_q @ down_q, ffn2: strength * up_f @ down_f,
                                                 bias: strength * diff})
            assert rel_err(out, tiny.reference_forward(patched, kw)) <= TOL
            assert rel_err(out, base) > 1e-3  # the patches really change the output
        group.set_weight_patches("t2v", {})
        assert torch.equal(group.forward("t2v", kw), base)
        assert group.launches == 1
    print("tp2:", {k: f"{e:.1e}" for k, e in errors.items()})
    assert all(e <= TOL for e in errors.values()), errors


def test_pipeline_with_cfg_split_and_ulysses_fallback(split_checkpoints):
    """pp2×cfg2: batch 2 gives each CFG group one row; batch 4 two rows, so the stages overlap two
    micro-batches; batch 1 runs pp2×Ulysses2. VACE hints cross the stage boundary (block 3);
    TI2V's per-token timesteps are embedded on every stage."""
    layouts = {4: Layout(2, 1, 1, pipeline=2), 2: Layout(2, 1, 1, pipeline=2), 1: Layout(1, 2, 1, pipeline=2)}
    errors = {}
    with WorkerGroup(cpu_config(pipeline=2, cfg=2)) as group:
        for v in ("t2v", "vace", "ti2v_5b"):
            path, model = split_checkpoints[v]
            info = group.load(v, path)
            if v == "t2v":
                check_loaded(info, model, 0.6, layouts[2])
            errors.update(run_forwards(group, v, model, v, (4, 2, 1) if v == "t2v" else (2, 1), layouts))
        assert group.launches == 1
    print("pp2 x cfg2:", {k: f"{e:.1e}" for k, e in errors.items()})
    assert all(e <= TOL for e in errors.values()), errors


def test_tensor_parallel_with_cfg_split_and_ulysses_fallback(tmp_path):
    """tp2×cfg2 on a 4-head model; batch 1 runs tp2×Ulysses2, each tensor rank's 2 heads split again
    by Ulysses."""
    layouts = {2: Layout(2, 1, 1, tensor=2), 1: Layout(1, 2, 1, tensor=2)}
    errors = {}
    with WorkerGroup(cpu_config(tensor=2, cfg=2)) as group:
        for i, v in enumerate(("t2v", "i2v")):
            model = tiny.build_model(v, seed=30 + i, heads=4)
            group.load(v, tiny.write_original_checkpoint(model, tmp_path / f"{v}.safetensors"))
            errors.update(run_forwards(group, v, model, v, (2, 1), layouts))
    print("tp2 x cfg2 / tp2 x U2:", {k: f"{e:.1e}" for k, e in errors.items()})
    assert all(e <= TOL for e in errors.values()), errors


def test_tensor_times_pipeline_the_seed_example(split_checkpoints):
    """The seed's example layout: 4 GPUs, pipeline 2 × tensor 2 (from the seed's own keys); each rank
    holds a quarter of the blocks' weights."""
    config = XDitUSPConfig.from_dict({"num_gpus": 4, "pipeline_parallel_size": 2, "tensor_parallel_size": 2,
                                      "device": "cpu", "dtype": "fp32"})
    layout = Layout(1, 1, 1, tensor=2, pipeline=2)
    errors = {}
    with WorkerGroup(config) as group:
        for v in ("t2v", "vace"):
            path, model = split_checkpoints[v]
            info = group.load(v, path)
            if v == "t2v":
                check_loaded(info, model, 0.35, layout)
            errors.update(run_forwards(group, v, model, v, (2, 1), {1: layout, 2: layout}))
    print("tp2 x pp2:", {k: f"{e:.1e}" for k, e in errors.items()})
    assert all(e <= TOL for e in errors.values()), errors


def test_config_composition_and_refusals():
    seed = XDitUSPConfig.from_dict({"num_gpus": 4, "pipeline_parallel_size": 2, "tensor_parallel_size": 2,
                                    "use_fp16": True, "device": "cpu"})
    assert seed.resolve(12) == Layout(1, 1, 1, tensor=2, pipeline=2) and seed.dtype == "fp16"
    assert str(seed.resolve(12)) == "pipeline2xtensor2xcfg1xulysses1xring1"
    assert str(Layout(2, 1, 1)) == "cfg2xulysses1xring1"  # unchanged without them
    # world = cfg × pipeline × tensor × Ulysses × ring; auto fills the rest
    cfg = XDitUSPConfig(world_size=8, tensor_parallel_degree=2, device="cpu")
    assert cfg.resolve(12) == Layout(2, 2, 1, tensor=2) and cfg.fallback_layout(12) == Layout(1, 2, 2, tensor=2)
    with pytest.raises(ConfigError, match="12 heads: with tensor_parallel_degree 2 each tensor rank holds 6, so Ulysses 2 works, 4 does not"):
        XDitUSPConfig(world_size=8, tensor_parallel_degree=2, ulysses_degree=4, device="cpu").resolve(12)
    with pytest.raises(ConfigError, match="tensor_parallel_degree 4 does not divide them"):
        XDitUSPConfig(world_size=4, tensor_parallel_degree=4, device="cpu").resolve(6)
    with pytest.raises(ConfigError, match=r"tensor_parallel_degree 2 × pipeline_parallel_degree 2 = 4 does not divide world_size 6"):
        XDitUSPConfig(world_size=6, tensor_parallel_degree=2, pipeline_parallel_degree=2, device="cpu").validate()
    with pytest.raises(ConfigError, match="must equal world_size 4 / .* = 2"):
        XDitUSPConfig(world_size=4, tensor_parallel_degree=2, ulysses_degree=4, device="cpu").validate()
    with pytest.raises(ConfigError, match="weight_sharding='fsdp' cannot be combined"):
        XDitUSPConfig(world_size=2, pipeline_parallel_degree=2, weight_sharding="fsdp", device="cpu").validate()
    with pytest.raises(ConfigError, match="compile is not supported with tensor_parallel_degree"):
        XDitUSPConfig(world_size=2, tensor_parallel_degree=2, compile=True, device="cpu").validate()
    XDitUSPConfig(world_size=2, pipeline_parallel_degree=2, compile=True, device="cpu").validate()  # pp compiles
    with pytest.raises(ConfigError, match="disagree"):
        XDitUSPConfig.from_dict({"tensor_parallel_size": 2, "tensor_parallel_degree": 1})
    with pytest.raises(ConfigError, match="enable_activation_checkpointing=True is not implemented"):
        XDitUSPConfig.from_dict({"num_gpus": 2, "enable_activation_checkpointing": True, "device": "cpu"})


def test_memory_plan_counts_split_bytes(split_checkpoints):
    """The plan's bytes a rank, per stage and tensor rank, from the header alone: the largest rank
    of tp2×pp2 holds about a quarter of the blocks and all of the embedders."""
    from comfyui_xdit_usp.parallel.memory import estimate, plan_load
    from comfyui_xdit_usp.wan_to_xdit_mapping import inspect_checkpoint

    info = inspect_checkpoint(split_checkpoints["t2v"][0])
    model = split_checkpoints["t2v"][1]
    full = sum(p.numel() * 4 for p in model.parameters())
    blocks = sum(p.numel() * 4 for n, p in model.named_parameters() if n.startswith("blocks."))
    config = cpu_config(tensor=2, pipeline=2)
    plan = plan_load(info, config, None)
    assert plan.placement == "split" and plan.weight_bytes == full
    assert blocks / 4 < plan.weight_bytes_per_rank <= 0.35 * full  # equal to what the ranks hold: test_tensor_times_pipeline
    assert "split (tensor / pipeline parallel) over 4 GPUs" in estimate(info, config, "split").describe()
