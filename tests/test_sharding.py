"""Weight sharding (FSDP2) and fp8 weight storage on CPU: real torchrun + gloo groups against a
single-process diffusers forward, at 2 and 4 ranks, in every layout kind.

A sharded group must give the replicated result (≤ 1e-5 in fp32) while each rank holds about 1/N
of the parameter bytes; fp8 storage must give exactly the arithmetic of fp8 weights dequantised at
load, at half the bytes of bf16 Linear weights.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfyui_xdit_usp.parallel import Layout, WorkerGroup, XDitUSPConfig, tiny
from comfyui_xdit_usp.parallel.tiny import rel_err
from comfyui_xdit_usp.parallel.protocol import WeightPatch
from comfyui_xdit_usp.wan_to_xdit_mapping import iter_weights, stored_tensors

SIZES = {"divisible": (2, 8, 8), "padded": (3, 6, 10)}  # latent (frames, h, w) -> 32 and 45 tokens
LAYOUTS = {  # name: (ulysses, ring, cfg)
    "ulysses2": (2, 1, 1),
    "ring2": (1, 2, 1),
    "cfg2": (1, 1, 2),
    "ulysses2xring2": (2, 2, 1),
    "cfg2xring2": (1, 2, 2),
}
TOL = 1e-5
SHARE = {2: 0.6, 4: 0.35}  # the largest rank's parameter bytes / the model's, at most


def cpu_config(ulysses, ring, cfg, **kw) -> XDitUSPConfig:
    kw = {"launch_timeout_s": 120, "forward_timeout_s": 120, "weight_sharding": "fsdp", **kw}
    return XDitUSPConfig(world_size=ulysses * ring * cfg, ulysses_degree=ulysses, ring_degree=ring, cfg_degree=cfg,
                         device="cpu", dtype="fp32", **kw)


@pytest.fixture(scope="module")
def references(checkpoints):
    refs = {}
    for v, (_, model) in checkpoints.items():
        for size_name, size in SIZES.items():
            for batch in (2, 1):
                kw = tiny.random_inputs(v, batch, *size, seed=7)
                refs[v, size_name, batch] = (kw, tiny.reference_forward(model, kw))
    return refs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_parity_every_variant(layout, checkpoints, references):
    u, r, c = LAYOUTS[layout]
    n = u * r * c
    with WorkerGroup(cpu_config(u, r, c)) as group:
        for v, (path, model) in checkpoints.items():
            info = group.load(v, path)
            assert info.placement == "fsdp" and info.layout == Layout(c, u, r)
            full = sum(p.numel() * p.element_size() for p in model.parameters())
            assert info.param_bytes_total == full
            assert len(info.param_bytes_per_rank) == n and sum(info.param_bytes_per_rank) == full
            assert info.param_bytes <= SHARE[n] * full, (v, info.param_bytes_per_rank, full)
            plan = info.memory_plan  # the owner's estimate, made from the header before the load
            assert (plan["placement"], plan["weight_bytes"], plan["weight_bytes_per_rank"]) == ("fsdp", full, info.param_bytes)
        errors = {}
        for (v, size_name, batch), (kw, ref) in references.items():
            out = group.forward(v, kw)
            assert out.shape == ref.shape
            errors[v, size_name, batch] = rel_err(out, ref)
        assert group.launches == 1
    worst = max(errors, key=errors.get)
    print(f"fsdp {layout}: worst max rel err {errors[worst]:.2e} at {worst}")
    assert all(e <= TOL for e in errors.values()), errors


@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_skipped_blocks_pass_the_stream_through(sharding, checkpoints):
    """ForwardInputs.skip_blocks (Skip Layer Guidance): the forward of diffusers' model without those
    blocks; with fsdp, a block prefetched by its predecessor and then skipped leaves the next
    forwards exact."""
    import dataclasses

    path, model = checkpoints["t2v"]
    kw = tiny.random_inputs("t2v", 2, *SIZES["padded"], seed=5)
    full = tiny.reference_forward(model, kw)
    blocks, without = model.blocks, {}
    try:
        for skip in ([1], [0]):
            model.blocks = torch.nn.ModuleList([b for i, b in enumerate(blocks) if i not in skip])
            without[tuple(skip)] = tiny.reference_forward(model, kw)
    finally:
        model.blocks = blocks
    with WorkerGroup(cpu_config(2, 1, 1, weight_sharding=sharding)) as group:
        group.load("m", path)
        for _ in range(2):
            for skip, ref in without.items():
                assert rel_err(group.forward("m", dataclasses.replace(kw, skip_blocks=list(skip))), ref) <= TOL
                assert rel_err(group.forward("m", kw), full) <= TOL


def test_lora_merges_into_shards_and_strength_change_needs_no_reload(checkpoints):
    """A LoRA on a weight split over 4 ranks, one on a weight only rank 0 holds rows of, and a diff
    patch on a bias: merged shard by shard, changed in strength, removed exactly."""
    path, model = checkpoints["t2v"]
    kw = tiny.random_inputs("t2v", 2, *SIZES["padded"])
    g = torch.Generator().manual_seed(5)
    ffn = "blocks.1.ffn.net.0.proj.weight"  # [512, 256]: 128 rows per rank
    q = "blocks.0.attn1.to_q.weight"  # [256, 256]
    bias = "blocks.0.attn2.to_out.0.bias"  # [256]
    up, down = torch.randn(512, 4, generator=g) * 0.5, torch.randn(4, 256, generator=g) * 0.5
    up_q, down_q = torch.randn(256, 2, generator=g) * 0.5, torch.randn(2, 256, generator=g) * 0.5
    diff = torch.randn(256, generator=g)
    with WorkerGroup(cpu_config(1, 2, 2)) as group:
        group.load("m", path)
        base = group.forward("m", kw)
        results = {}
        for strength in (1.0, 0.5):
            group.set_weight_patches("m", {ffn: [WeightPatch("lora", [up, down], strength)],
                                           q: [WeightPatch("lora", [up_q, down_q], strength)],
                                           bias: [WeightPatch("diff", [diff], strength)]})
            results[strength] = group.forward("m", kw)
        group.set_weight_patches("m", {})
        restored = group.forward("m", kw)
        assert group.launches == 1
    for strength, out in results.items():
        patched = tiny.patched_model(model, {ffn: strength * up @ down, q: strength * up_q @ down_q,
                                             bias: strength * diff})
        assert rel_err(out, tiny.reference_forward(patched, kw)) <= TOL
        assert rel_err(out, base) > 1e-3  # the LoRA really changes the output
    assert torch.equal(restored, base)


def test_weight_patches_of_every_kind_on_shards(checkpoints, tmp_path):
    """What ComfyUI's model-merging and patch nodes put on a weight, applied to each rank's rows as
    comfy.lora.calculate_weight applies it (W <- strength_model * W, then the patch): a merge with a
    second checkpoint the workers read (with that model's own patch), strength_model != 1 under a
    LoRA, a "set" patch; then removed exactly."""
    path, model = checkpoints["t2v"]
    other = tiny.build_model("t2v", seed=10)
    other_path = tiny.write_original_checkpoint(other, tmp_path / "other.safetensors")
    kw = tiny.random_inputs("t2v", 2, *SIZES["padded"])
    g = torch.Generator().manual_seed(6)
    ffn = "blocks.1.ffn.net.0.proj.weight"  # [512, 256]: rows split over the ranks
    norm = "blocks.0.norm2.weight"  # kept in fp32, split too
    q = "blocks.0.attn1.to_q.weight"
    bias = "blocks.0.attn2.to_out.0.bias"
    up, down = torch.randn(256, 2, generator=g) * 0.5, torch.randn(2, 256, generator=g) * 0.5
    delta = torch.randn(512, 256, generator=g) * 0.1  # the second model's own patch
    value = torch.randn(256, generator=g)
    patches = {
        ffn: [WeightPatch("weight", [], 0.3, 0.7, path=str(other_path), name=ffn,
                          patches=[WeightPatch("diff", [delta], 0.5)])],
        norm: [WeightPatch("weight", [], 0.75, 0.25, path=str(other_path), name=norm)],
        q: [WeightPatch("lora", [up, down], 0.6, 0.8)],
        bias: [WeightPatch("diff", [value], 1.0), WeightPatch("set", [value], 0.0, 2.0)],
    }
    with WorkerGroup(cpu_config(2, 1, 1)) as group:
        group.load("m", path)
        base = group.forward("m", kw)
        assert group.set_weight_patches("m", patches).patched == 4
        out = group.forward("m", kw)
        group.set_weight_patches("m", {})
        restored = group.forward("m", kw)
    expected = tiny.build_model("t2v", seed=0)
    expected.load_state_dict(model.state_dict())
    params, theirs = dict(expected.named_parameters()), dict(other.named_parameters())
    with torch.no_grad():
        params[ffn].copy_(0.7 * params[ffn] + 0.3 * (theirs[ffn] + 0.5 * delta))
        params[norm].copy_(0.25 * params[norm] + 0.75 * theirs[norm])
        params[q].copy_(0.8 * params[q] + 0.6 * up @ down)
        params[bias].copy_(value)
    assert rel_err(out, tiny.reference_forward(expected, kw)) <= TOL
    assert rel_err(out, base) > 1e-3
    assert torch.equal(restored, base)


def test_each_rank_reads_only_its_rows(checkpoints):
    path, model = checkpoints["vace"]
    stored = stored_tensors(path)
    full = dict(model.named_parameters())
    for rank in range(4):
        def rows(name, shape, rank=rank):
            per = -(-shape[0] // 4)
            return slice(min(rank * per, shape[0]), min((rank + 1) * per, shape[0]))

        _, it = iter_weights(path, rows=rows)
        for name, w, scale in it:
            assert scale is None and stored[name][0] == tuple(full[name].shape)
            assert torch.equal(w, full[name].detach()[rows(name, full[name].shape)])


# ---- fp8 storage ----------------------------------------------------------------------------------
def _linear_weights(model) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _fp32_kept(model, name: str) -> bool:
    keep = set(type(model)._keep_in_fp32_modules or ())
    return any(part in keep for part in name.split("."))


def _rounded_to_fp8(model, fp8=torch.float8_e4m3fn):
    """The reference for fp8 storage: every Linear weight (not kept in fp32) rounded to fp8."""
    out = tiny.build_model("t2v", seed=0)
    out.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name in _linear_weights(out) and not _fp32_kept(out, name):
                p.copy_(p.to(fp8).float())
    return out


@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_fp8_weight_dtype_halves_linear_bytes_and_upcasts_at_use(sharding, checkpoints):
    path, model = checkpoints["t2v"]
    kw = tiny.random_inputs("t2v", 2, *SIZES["padded"])
    with WorkerGroup(cpu_config(2, 1, 1, weight_sharding=sharding, weight_dtype="fp8_e4m3fn")) as group:
        info = group.load("m", path)
        out = group.forward("m", kw)
    linear = _linear_weights(model)
    fp8_numel = sum(p.numel() for n, p in model.named_parameters() if n in linear and not _fp32_kept(model, n))
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    assert info.param_bytes_total == full - 3 * fp8_numel  # fp32 -> 1 byte for those weights
    assert info.memory_plan["weight_bytes"] == info.param_bytes_total
    assert rel_err(out, tiny.reference_forward(_rounded_to_fp8(model), kw)) <= TOL
    assert rel_err(out, tiny.reference_forward(model, kw)) > TOL  # fp8 is not exact against fp32


def test_scaled_fp8_file_stays_fp8_with_its_scale(checkpoints, tmp_path):
    """A ComfyUI scaled-fp8 file (one scale per weight): held as stored, dequantised per use with
    exactly the arithmetic of dequantising at load."""
    path, model = checkpoints["t2v"]
    sd = tiny.original_state_dict(model)
    scaled, dequantised = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}, {}
    for k, v in sd.items():
        if v.ndim == 2 and k.startswith("blocks.") and not k.endswith("modulation"):
            scale = v.abs().max() / 448
            q = (v / scale).to(torch.float8_e4m3fn)
            scaled[k], scaled[k.replace(".weight", ".scale_weight")] = q, scale.reshape(1)
            dequantised[k] = q.float() * scale
        else:
            scaled[k] = dequantised[k] = v
    file = tmp_path / "scaled.safetensors"
    save_file(scaled, str(file))
    ref_model = tiny.build_model("t2v", seed=0)
    ref_path = tiny.write_original_checkpoint(ref_model, tmp_path / "ref.safetensors")
    from comfyui_xdit_usp.wan_to_xdit_mapping import load_checkpoint

    save_file(dequantised, str(ref_path))
    ref_model.load_state_dict(load_checkpoint(ref_path)[0])
    kw = tiny.random_inputs("t2v", 2, *SIZES["padded"])
    with WorkerGroup(cpu_config(2, 1, 1)) as group:
        info = group.load("m", str(file))
        out = group.forward("m", kw)
    n_fp8 = sum(v.numel() for k, v in scaled.items() if v.dtype == torch.float8_e4m3fn and k != "scaled_fp8")
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    assert info.param_bytes_total == full - 3 * n_fp8
    assert info.memory_plan["weight_bytes"] == info.param_bytes_total
    assert rel_err(out, tiny.reference_forward(ref_model, kw)) <= TOL
