"""parallel/memory.py: the per-GPU memory plan. Pure CPU, no processes, meta-device models."""
from __future__ import annotations

import re

import pytest
import torch

from comfyui_xdit_usp.parallel import ConfigError, XDitUSPConfig, tiny
from comfyui_xdit_usp.parallel.memory import (GB, card_bytes, estimate, freed_bytes, plan_load, shared_footprint,
                                              shared_rank)
from comfyui_xdit_usp.wan_to_xdit_mapping import CheckpointInfo, inspect_checkpoint

P720, P480 = (21, 90, 160), (21, 60, 104)  # latents of 1280x720x81 (75,600 tokens) and 832x480x81 (32,760)


def wan_info(size: str) -> CheckpointInfo:
    """The CheckpointInfo inspect_checkpoint gives for a real Wan 2.1 T2V checkpoint."""
    heads, ffn, layers = {"1.3B": (12, 8960, 30), "14B": (40, 13824, 40)}[size]
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=128, in_channels=16,
               out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=ffn, num_layers=layers, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
               rope_max_seq_len=1024, pos_embed_seq_len=None)
    return CheckpointInfo(format="original", variant="t2v", diffusers_class="WanTransformer3DModel",
                          diffusers_config=cfg, source_dtype="bfloat16", path=None, num_layers=layers,
                          num_heads=heads, dim=heads * 128)


def meta_model(info: CheckpointInfo):
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, info.diffusers_class)(**info.diffusers_config)


def keep_fp32(model, name: str) -> bool:
    return any(part in type(model)._keep_in_fp32_modules for part in name.split("."))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """variant -> (model, CheckpointInfo of its fp32 original-layout file)."""
    out = {}
    for variant in ("t2v", "vace"):
        model = tiny.build_model(variant)
        path = tiny.write_original_checkpoint(model, tmp_path_factory.mktemp(variant) / "model.safetensors")
        out[variant] = model, inspect_checkpoint(path)
    return out


# ---- weights --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["t2v", "vace"])
@pytest.mark.parametrize("dtype,itemsize", [("bf16", 2), ("fp32", 4)])
def test_weight_bytes_are_the_parameters_storage(tiny_ckpt, variant, dtype, itemsize):
    model, info = tiny_ckpt[variant]
    expected = sum(p.numel() * (4 if keep_fp32(model, n) else itemsize) for n, p in model.named_parameters())
    plan = estimate(info, XDitUSPConfig(dtype=dtype), "replicated")
    assert plan.weight_bytes == plan.weight_bytes_per_rank == plan.peak_bytes == expected
    assert plan.gathered_bytes == plan.activation_bytes == 0 and plan.fits and plan.budget_bytes is None


def test_fp8_linear_weights_in_the_file_stay_one_byte(tmp_path):
    model = tiny.build_model("t2v")
    info = inspect_checkpoint(tiny.write_original_checkpoint(model, tmp_path / "fp8.safetensors",
                                                             dtype=torch.float8_e4m3fn))
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = sum(p.numel() * (4 if keep_fp32(model, n) else 1 if n in linear else 2)
                   for n, p in model.named_parameters())
    assert estimate(info, XDitUSPConfig(), "replicated").weight_bytes == expected


def test_fp8_weight_dtype_halves_the_linear_weights():
    info = wan_info("14B")
    model = meta_model(info)
    linear = sum(m.weight.numel() * 2 for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not keep_fp32(model, name + ".weight"))
    bf16 = estimate(info, XDitUSPConfig(), "replicated").weight_bytes
    fp8 = estimate(info, XDitUSPConfig(weight_dtype="fp8_e4m3fn"), "replicated").weight_bytes
    assert bf16 - fp8 == linear // 2
    assert linear > 0.98 * bf16  # nearly all of Wan is Linear weights


@pytest.mark.parametrize("size,n", [("14B", 2), ("14B", 8), ("1.3B", 3)])
def test_fsdp_shards_every_parameter_like_torch_chunk(size, n):
    info = wan_info(size)
    model = meta_model(info)
    itemsize = {name: 4 if keep_fp32(model, name) else 2 for name, _ in model.named_parameters()}
    rank0 = sum(p.chunk(n)[0].numel() * itemsize[name] for name, p in model.named_parameters())
    plan = estimate(info, XDitUSPConfig(world_size=n), "fsdp")
    assert plan.weight_bytes_per_rank == rank0
    assert plan.weight_bytes / n < rank0 < 1.002 * plan.weight_bytes / n  # [1, 6, dim] tables stay whole

    def gathered(prefix):  # a unit's parameters as the all-gather allocates them: n padded shards
        return sum(n * p.chunk(n)[0].numel() * itemsize[name] for name, p in model.named_parameters()
                   if name.startswith(prefix))

    root = sum(n * p.chunk(n)[0].numel() * itemsize[name] for name, p in model.named_parameters()
               if not name.startswith(("blocks.", "condition_embedder.")))
    # the running block, and the prefetched one twice while it is copied out of its all-gather buffer
    assert plan.gathered_bytes == root + 3 * gathered("blocks.0.")


def test_fsdp_over_one_rank_holds_what_replicated_holds():
    info = wan_info("1.3B")
    a, b = (estimate(info, XDitUSPConfig(), placement, P480, 2, 80 * GB) for placement in ("fsdp", "replicated"))
    assert (a.weight_bytes_per_rank, a.gathered_bytes, a.peak_bytes) == (b.weight_bytes_per_rank, 0, b.peak_bytes)


# ---- activations: the calibration measurements (torch.cuda.max_memory_allocated, GB = 2**30) ------------
@pytest.mark.parametrize("size,gpus,batch,latent,measured", [
    ("14B", 1, 1, P720, 34.75), ("14B", 1, 2, P720, 42.8), ("14B", 2, 2, P720, 35.5),  # 2 GPUs: cfg split
    ("1.3B", 1, 1, P480, 4.21), ("1.3B", 1, 2, P480, 5.7), ("1.3B", 2, 2, P480, 4.2),
])
def test_peak_reproduces_the_measurements(size, gpus, batch, latent, measured):
    plan = estimate(wan_info(size), XDitUSPConfig(world_size=gpus), "replicated", latent, batch)
    assert 1.0 <= plan.peak_bytes / (measured * GB) <= 1.15


# fsdp on 4×H200 (BENCHMARKS.md, "Four GPUs"): the weights' shard, the gathered units, the activations
@pytest.mark.parametrize("size,latent,batch,ulysses,cfg,measured", [
    ("14B", P720, 2, 2, 2, 13.11), ("14B", P720, 1, 4, 1, 10.95), ("1.3B", P480, 2, 2, 2, 1.74),
])
def test_fsdp_peak_is_not_under_the_measurements(size, latent, batch, ulysses, cfg, measured):
    config = XDitUSPConfig(world_size=4, ulysses_degree=ulysses, ring_degree=1, cfg_degree=cfg)
    plan = estimate(wan_info(size), config, "fsdp", latent, batch)
    assert 1.0 <= plan.peak_bytes / (measured * GB) <= 1.15


def test_activations_split_over_the_sequence_ranks():
    info = wan_info("14B")
    one, four = (estimate(info, XDitUSPConfig(world_size=n, cfg_degree=1), "replicated", P720, 1).activation_bytes
                 for n in (1, 4))
    assert 0.25 * one < four < 0.3 * one
    fp32 = estimate(info, XDitUSPConfig(dtype="fp32"), "replicated", P720, 1).activation_bytes
    assert 1.9 * one < fp32 < 2 * one
    # tensor parallel splits the stream too (sequence parallel): half the tokens a rank, plus the
    # gathered input and the partial sums of the whole sequence shard at full width
    tp2 = estimate(info, XDitUSPConfig(world_size=2, tensor_parallel_degree=2), "split", P720, 1).activation_bytes
    assert 0.6 * one < tp2 < 0.7 * one


# ---- plan_load ----------------------------------------------------------------------------------------
def test_auto_replicates_what_fits():
    plan = plan_load(wan_info("1.3B"), XDitUSPConfig(), 80 * GB)
    assert plan.placement == "replicated" and plan.fits and plan.activation_bytes > 0  # planned at 480p


def test_auto_shards_what_does_not_fit():
    info = wan_info("14B")
    plan = plan_load(info, XDitUSPConfig(world_size=2), 32 * GB, latent=P720)
    assert plan.placement == "fsdp" and plan.fits
    assert not estimate(info, XDitUSPConfig(world_size=2), "replicated", P720, 2, 32 * GB).fits
    # at 2 x 24 GB fsdp is chosen too, and still too big at batch 2; batch 1 (sequence split) fits
    with pytest.raises(ConfigError, match=r"fsdp over 2 GPUs: .* = 24\.\d GB of 24\.0 GB"):
        plan_load(info, XDitUSPConfig(world_size=2), 24 * GB, latent=P720)
    assert plan_load(info, XDitUSPConfig(world_size=2), 24 * GB, latent=P720, batch=1).placement == "fsdp"


def test_auto_counts_the_models_already_loaded():
    info, config = wan_info("14B"), XDitUSPConfig(world_size=2)
    assert plan_load(info, config, 48 * GB, latent=P720).placement == "replicated"
    other = plan_load(info, XDitUSPConfig(world_size=2, weight_sharding="fsdp"), 48 * GB, latent=P720)
    second = plan_load(info, config, 48 * GB, latent=P720, resident_bytes=other.weight_bytes_per_rank)
    assert second.placement == "fsdp" and second.fits
    assert second.peak_bytes == other.peak_bytes + other.weight_bytes_per_rank
    assert "13.3 held by other models" in second.describe()
    # the other expert loaded unsharded: the second does not fit next to it, and the refusal says why
    with pytest.raises(ConfigError, match=r"26\.7 GB/GPU are held by models already loaded .* weight_sharding='fsdp'"):
        plan_load(info, config, 48 * GB, latent=P720, resident_bytes=plan_load(info, config, 48 * GB).weight_bytes_per_rank)


def test_refusal_names_what_fits():
    info = wan_info("14B")
    with pytest.raises(ConfigError) as e:
        plan_load(info, XDitUSPConfig(), 24 * GB)
    msg = str(e.value)
    assert "replicated on 1 GPU" in msg and "of 24.0 GB" in msg and "1280x720x81" in msg
    n = int(re.search(r"weight_sharding='fsdp', world_size=(\d+)", msg).group(1))
    assert estimate(info, XDitUSPConfig(world_size=n), "fsdp", P720, 2, 24 * GB).fits
    assert not estimate(info, XDitUSPConfig(world_size=n - 1), "fsdp", P720, 2, 24 * GB).fits
    assert "weight_dtype='fp8_e4m3fn'" in msg and "gpu_memory_fraction is already 1.0" in msg
    with pytest.raises(ConfigError, match=r"weights alone .* gpu_memory_fraction=1\.0 \(24\.0 GB\) would fit"):
        plan_load(info, XDitUSPConfig(weight_sharding="fsdp", world_size=2, gpu_memory_fraction=0.5), 24 * GB)


def test_cpu_never_refuses():
    config = XDitUSPConfig(world_size=1, device="cpu")
    assert card_bytes(config) is None
    plan = plan_load(wan_info("14B"), config, card_bytes(config), latent=P720)
    assert plan.fits and plan.budget_bytes is None and plan.placement == "replicated"
    assert "no GPU budget known" in plan.describe()


def test_describe_reads_in_gb():
    plan = estimate(wan_info("14B"), XDitUSPConfig(world_size=2), "fsdp", P720, 2, 80 * GB)
    assert re.fullmatch(r"fsdp over 2 GPUs: weights 13\.\d GB/GPU \(26\.7 total\) \+ 2\.\d gathered \+ \d\.\d "
                        r"activations = \d\d\.\d GB of 80\.0 GB \(gpu_memory_fraction 1\.0\)", plan.describe())
    assert plan.as_dict()["peak_bytes"] == plan.peak_bytes


def test_card_bytes_is_the_smallest_card(monkeypatch):
    sizes = {0: 80 * GB, 1: 24 * GB, 2: 48 * GB}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": sizes[i]}))
    assert card_bytes(XDitUSPConfig(world_size=2, device_ids=[0, 2])) == 48 * GB
    assert card_bytes(XDitUSPConfig(world_size=3)) == 24 * GB


# ---- what ComfyUI is told about a rank on its GPU (numbers of issue 12: 1.3B, 2.65 GB of weights) --
def test_shared_rank_is_the_rank_on_comfyuis_gpu():
    assert shared_rank([0, 1], 0) == 0
    assert shared_rank([2, 0, 1], 0) == 1  # device_ids=[2, 0, 1]: rank 1 runs on GPU 0
    assert shared_rank([1, 2], 0) is None  # ComfyUI on GPU 0, workers on 1 and 2: nothing shared
    assert shared_rank([0, 1], None) is None


def test_footprint_before_the_load_is_the_planned_peak():
    # ComfyUI makes room for what the load and the first forward will take, not for nothing
    assert shared_footprint(False, params=int(2.65 * GB), peak_estimate=int(4.38 * GB)) == (int(4.38 * GB), 0)
    assert shared_footprint(False, params=int(2.65 * GB), peak_estimate=0) == (int(2.65 * GB), 0)


def test_footprint_loaded_before_and_after_the_first_forward():
    w = int(2.65 * GB)
    # right after the load (trimmed): it holds its weights; the forward still needs the rest of the plan
    size, held = shared_footprint(True, w, int(4.38 * GB), reserved=w + 2**20, params_all=w)
    assert held == w + 2**20 and size == int(4.38 * GB)
    # after a forward the cache stays reserved (8.5 GB in nvidia-smi for a 4.2 GB peak): all of it is held
    size, held = shared_footprint(True, w, int(4.38 * GB), reserved=int(8.5 * GB), params_all=w,
                                  forward_peak=int(4.21 * GB))
    assert held == int(8.5 * GB) and size == held
    # after a trim only the weights are held, and the last forward's peak is what the next one needs
    size, held = shared_footprint(True, w, int(4.38 * GB), reserved=w, params_all=w, forward_peak=int(4.21 * GB))
    assert (size, held) == (int(4.21 * GB), w)
    # figures unknown (the workers could not be asked): the weights
    assert shared_footprint(True, w, int(4.38 * GB)) == (int(4.38 * GB), w)


def test_two_models_on_a_rank_add_up_to_what_it_reserves():
    hi, lo, reserved = 3 * GB, 1 * GB, 10 * GB  # the Wan 2.2 experts (unequal here) and the shared cache
    a = shared_footprint(True, hi, 5 * GB, reserved=reserved, params_all=hi + lo, forward_peak=7 * GB)
    b = shared_footprint(True, lo, 2 * GB, reserved=reserved, params_all=hi + lo, forward_peak=4 * GB)
    assert a[1] + b[1] == reserved  # nothing counted twice
    assert (a[1], b[1]) == (3 * GB + 4.5 * GB, 1 * GB + 1.5 * GB)  # the cache split by parameter bytes
    # a forward's peak counts the other expert's weights too: not this model's
    assert b[0] == max(b[1], 4 * GB - hi)


def test_freed_bytes_of_a_trim():
    assert freed_bytes(int(8.5 * GB), int(2.7 * GB)) == int(8.5 * GB) - int(2.7 * GB)
    assert freed_bytes(GB, GB) == 0
    assert freed_bytes(GB, 2 * GB) == 0  # grew meanwhile: nothing freed, never negative
    assert freed_bytes(None, GB) == freed_bytes(GB, None) == 0
