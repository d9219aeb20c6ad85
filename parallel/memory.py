"""The per-GPU memory plan: will one Wan transformer, placed this way, fit on these cards?

Checked in the owner before any worker starts, from the checkpoint's header and a meta-device model
(no weights read). Every number is bytes on one rank, the largest one; "GB" in messages is 2**30
bytes, the unit `torch.cuda.max_memory_allocated` figures and BENCHMARKS.md are written in.

Weights: each parameter at the size the runtime stores it in (`_itemsize`): diffusers'
`_keep_in_fp32_modules` in fp32; with `weight_dtype` fp8_* every other nn.Linear weight in 1 byte
(biases and the rest in the compute dtype); with "default" a Linear weight the file holds as fp8
(plain or scaled) stays 1 byte, the rest is the compute dtype.

Placement: "replicated" puts every parameter on every rank. "fsdp" (FSDP2 `fully_shard`) splits
every parameter on dim 0 over all ranks as `torch.chunk` does, ceil(rows / N) rows a rank, so rank
0 is the largest and a [1, 6, dim] modulation table is not split at all. Its units are each block
(`blocks.i`, `vace_blocks.i`), `condition_embedder` and the root (the rest). During a forward the
root is gathered throughout and at most two more units at once (the running block and the
prefetched next one, or the condition embedder and block 0), and the prefetched one twice while it
is copied out of its all-gather buffer into its parameters: `gathered_bytes` is the root, the
largest unit and twice the next largest, at the padded size the all-gather allocates. (Counting
that copy once under-estimated 14B `fsdp` on 4 GPUs by 2 to 4%: 12.81 planned for 13.11 GB
measured at batch 2, 10.52 for 10.95 at batch 1.)

"split" (tensor × pipeline parallel, parallel/model_parallel.py): each (stage, tensor rank) holds
its stage's blocks, of their attention and FFN Linears its tensor rank's rows or columns (the
row-parallel biases on tensor rank 0), and whole everything else it runs (the condition embedder
everywhere, the patch embedding on the first stage, the head on the last); the largest is counted.
No gathering of weights. Tensor parallel splits the stream between blocks over the tensor ranks
(sequence parallel, model_parallel.py): a rank's tokens are its sequence shard's / tensor, and a
block also holds the normed input gathered from the tensor ranks and a row-parallel Linear's
partial sums before their reduce-scatter, each [rows, tokens * tensor, dim] (the `gathered` term
below; q/k/v, the attention output and the FFN hidden layer are the gathered tokens' local heads /
units: tokens * tensor * width / tensor, the per-token term). A pipeline stage holds one batch
row's at a time (counted as all of them: an over-estimate for it).

Activations, per rank, for `rows` batch rows of `tokens` video tokens on that rank (the configured
layout when the batch divides by its CFG degree, else the batch-1 fallback; tokens = ceil(video
tokens / (sp * tensor))), compute-dtype itemsize `item`:

    blocks = rows * tokens * ((20 * dim + 2 * ffn_dim) * item / 2
                              + VACE: (len(vace_layers) + 1) * dim * item    (hints + control stream)
                              + per-token timesteps (TI2V-5B): dim * (7 * item + 24))
                                (temb and its 6-way projection, each block's fp32 modulation)
    embed  = rows * video_tokens * 3 * dim * item     (before the split: the patch embedding of the
                                                       whole video, its padded copy and the shard)
    gathered = tensor > 1: rows * tokens * tensor * 2 * dim * item
    activations = max(blocks + gathered, embed) + 256 MiB   (workspaces, text/image context)

The 20 * dim + 2 * ffn_dim bytes a token are the residual stream, the fp32 norm and modulation
temporaries, q/k/v and RoPE temporaries of a block, and its FFN hidden layer, fitted to these peaks
of `torch.cuda.max_memory_allocated` (bf16, 512 text tokens, H100/H200, BENCHMARKS.md; the weights
are this module's exact count, 26.67 GB for 14B and 2.65 GB for 1.3B):

    model  GPUs  rows x tokens a rank  measured  estimated  ratio
    14B    1     1 x 75,600             34.75      36.08     1.038
    14B    1     2 x 75,600             42.80      45.23     1.057
    14B    2     1 x 75,600 (cfg split) 35.50      36.08     1.016
    1.3B   1     1 x 32,760              4.21       4.38     1.041
    1.3B   1     2 x 32,760              5.70       5.87     1.029
    1.3B   2     1 x 32,760 (cfg split)  4.20       4.38     1.044

and with `fsdp` (weights / N plus the gathered units above), 4×H200:

    14B    4     1 x 37,800 (cfg2 x U2)    13.11      13.47     1.027
    14B    4     1 x 18,900 (U4)           10.95      11.18     1.021
    1.3B   4     1 x 16,380 (cfg2 x U2)     1.74       1.92     1.105

These peaks predate the block pieces (sp_wan._block_forward), which lower the activations of
long shards (1.3B on one GPU at batch 2: 5.67 -> 3.86 GB): the model is an upper bound for them.

The VACE, per-token-timestep and embedding terms are counted from the tensors the forward keeps
(parallel/sp_wan.py), not measured. Not counted: the CUDA context and NCCL buffers (outside the
caching allocator), the RoPE tables (2 MB), the compute-dtype copy of one fp8 weight while its layer
runs, and allocator fragmentation (the cap `gpu_memory_fraction` sets is on reserved memory).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from .config import AUTO, ConfigError, XDitUSPConfig

if TYPE_CHECKING:
    from ..wan_to_xdit_mapping import CheckpointInfo

GB = 2**30
PLACEMENTS = ("replicated", "fsdp", "split")
_ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
# The activation model above: bytes a token a row at a 2-byte compute dtype, and the fixed part.
_DIM_BYTES, _FFN_BYTES, _FIXED = 20, 2, 256 * 2**20
_MAX_WORLD_SIZE = 8  # the most GPUs (of one host) a refusal suggests


@dataclass(frozen=True)
class MemoryPlan:
    """One model's bytes on the largest rank of a group, and whether they fit the budget."""

    placement: str               # "replicated" | "fsdp" | "split" (tensor / pipeline parallel)
    world_size: int
    weight_bytes: int            # the whole model as stored on the GPUs
    weight_bytes_per_rank: int   # resident between forwards on the largest rank
    gathered_bytes: int          # fsdp: the root + the two largest units in flight; 0 when replicated
    activation_bytes: int        # per rank at the given size; 0 when no size is given
    budget_bytes: Optional[int]  # gpu_memory_fraction x the smallest card's memory; None when unknown (CPU)
    peak_bytes: int              # weights per rank + resident + gathered + activations
    fits: bool                   # peak_bytes <= budget (True when budget is None)
    resident_bytes: int = 0      # per rank, held by the group's other loaded models (the other Wan 2.2 expert)
    gpu_memory_fraction: float = 1.0

    def describe(self) -> str:
        """One line, e.g. "fsdp over 2 GPUs: weights 14.3 GB/GPU (28.6 total) + 1.4 gathered +
        6.8 activations = 22.5 GB of 79.1 GB (gpu_memory_fraction 1.0)"."""
        gpus = f"{self.world_size} GPU{'s' if self.world_size > 1 else ''}"
        where = {"fsdp": f"fsdp over {gpus}", "split": f"split (tensor / pipeline parallel) over {gpus}"}.get(
            self.placement, f"replicated on {gpus}")
        terms = [f"weights {_gb(self.weight_bytes_per_rank)} GB/GPU ({_gb(self.weight_bytes)} total)"]
        for nbytes, what in ((self.resident_bytes, "held by other models"), (self.gathered_bytes, "gathered"),
                             (self.activation_bytes, "activations")):
            if nbytes:
                terms.append(f"{_gb(nbytes)} {what}")
        if self.budget_bytes is None:
            budget = "no GPU budget known"
        else:
            budget = f"of {_gb(self.budget_bytes)} GB (gpu_memory_fraction {self.gpu_memory_fraction})"
        return f"{where}: {' + '.join(terms)} = {_gb(self.peak_bytes)} GB {budget}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _gb(nbytes: int) -> str:
    return f"{nbytes / GB:.1f}"


# ---- weights ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Param:
    name: str
    numel: int
    rows: int            # size of dim 0, the one FSDP splits
    shape: tuple         # the whole shape (tensor parallel splits dim 0 or dim 1)
    unit: str            # FSDP unit: "root", "condition_embedder", "blocks.3", "vace_blocks.0"
    linear_weight: bool  # the weight of an nn.Linear
    keep_fp32: bool      # in diffusers' _keep_in_fp32_modules


@functools.lru_cache(maxsize=8)
def _params(cls_name: str, cfg_json: str) -> tuple[_Param, ...]:
    """Every parameter of the diffusers class built on the meta device (14B: well under a second)."""
    import diffusers

    from ..wan_to_xdit_mapping import fp32_predicate

    cls = getattr(diffusers, cls_name)
    with torch.device("meta"):
        model = cls(**json.loads(cfg_json))
    linear = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    keep_fp32 = fp32_predicate(cls)
    return tuple(_Param(name, p.numel(), p.shape[0], tuple(p.shape), _unit(name), name in linear, keep_fp32(name))
                 for name, p in model.named_parameters())


def _model_params(info: CheckpointInfo) -> tuple[_Param, ...]:
    return _params(info.diffusers_class, json.dumps(info.diffusers_config, sort_keys=True))


def _unit(name: str) -> str:
    parts = name.split(".")
    if parts[0] in ("blocks", "vace_blocks"):
        return ".".join(parts[:2])
    return parts[0] if parts[0] == "condition_embedder" else "root"


def _fp8_in_file(info: CheckpointInfo) -> frozenset[str]:
    """Diffusers names of the tensors the checkpoint file stores as fp8 (from its header)."""
    if info.path is None:
        return frozenset()
    from ..wan_to_xdit_mapping import stored_tensors

    return frozenset(name for name, (_, dtype, _) in stored_tensors(info.path, info).items() if dtype.startswith("float8"))


def _itemsize(p: _Param, weight_dtype: str, compute: int, fp8_in_file: frozenset[str]) -> int:
    """Bytes an element of `p` takes on the GPU (the storage rules in the module docstring)."""
    if p.keep_fp32:
        return 4
    if weight_dtype != "default":
        return 1 if p.linear_weight else compute
    return 1 if p.linear_weight and p.name in fp8_in_file else compute


def _weights(info: CheckpointInfo, config: XDitUSPConfig) -> list[tuple[_Param, int]]:
    """(parameter, bytes an element) for every parameter of `info`'s model under `config`."""
    weight_dtype = config.storage_weight_dtype
    fp8 = _fp8_in_file(info) if weight_dtype == "default" else frozenset()
    compute = _ITEMSIZE[config.dtype]
    return [(p, _itemsize(p, weight_dtype, compute, fp8)) for p in _model_params(info)]


def _shard(p: _Param, itemsize: int, n: int) -> int:
    """Bytes of rank 0's `torch.chunk` shard of `p` over `n` ranks, the largest one."""
    return -(-p.rows // n) * (p.numel // p.rows) * itemsize


def _split_per_rank(weights: list[tuple[_Param, int]], config: XDitUSPConfig, num_layers: int) -> int:
    """Bytes the largest rank holds under tensor × pipeline parallelism (model_parallel.py's rules)."""
    from .model_parallel import held_by, part_shape, tp_part

    tp, pp = config.tensor_parallel_degree, config.pipeline_parallel_degree
    largest = 0
    for stage in range(pp):
        for rank in range(tp):
            largest = max(largest, sum(
                math.prod(part_shape(p.shape, tp_part(p.name, p.shape, tp, rank))) * itemsize
                for p, itemsize in weights if held_by(p.name, num_layers, tp, pp, rank, stage)))
    return largest


def _gathered(weights: list[tuple[_Param, int]], n: int) -> int:
    """Bytes of the units an FSDP forward holds gathered at once (padded to n equal shards)."""
    units = Counter()
    for p, itemsize in weights:
        units[p.unit] += n * _shard(p, itemsize, n)
    root, embedder = units.pop("root", 0), units.pop("condition_embedder", 0)
    first, second = (sorted(units.values(), reverse=True) + [0, 0])[:2]
    return root + first + 2 * max(second, embedder)


# ---- activations ------------------------------------------------------------------------------------
def _activation_bytes(info: CheckpointInfo, config: XDitUSPConfig, latent: tuple[int, int, int],
                      batch: int) -> int:
    """The activation model in the module docstring, for `batch` rows of a `latent` video."""
    cfg = info.diffusers_config
    layout = config.resolve(info.num_heads)
    if batch % layout.cfg:
        layout = config.fallback_layout(info.num_heads)
    rows = batch // layout.cfg
    video_tokens = math.prod(size // patch for size, patch in zip(latent, cfg["patch_size"]))
    tokens = -(-video_tokens // (layout.sp * layout.tensor))
    item, dim = _ITEMSIZE[config.dtype], info.dim
    per_token = (_DIM_BYTES * dim + _FFN_BYTES * cfg["ffn_dim"]) * item // 2
    if "vace_layers" in cfg:
        per_token += (len(cfg["vace_layers"]) + 1) * dim * item
    if info.variant == "ti2v_5b":
        per_token += dim * (7 * item + 24)
    embed = rows * video_tokens * 3 * dim * item
    gathered = rows * tokens * layout.tensor * 2 * dim * item if layout.tensor > 1 else 0
    return max(rows * tokens * per_token + gathered, embed) + _FIXED


# ---- plans ------------------------------------------------------------------------------------------
def estimate(info: CheckpointInfo, config: XDitUSPConfig, placement: str,
             latent: Optional[tuple[int, int, int]] = None, batch: int = 2,
             card_bytes: Optional[int] = None, resident_bytes: int = 0) -> MemoryPlan:
    """The memory plan of `info`'s model under `config` with `placement`, for `batch` rows of a
    `latent` (frames, height, width) video, on cards of `card_bytes` each (None: no budget).
    `resident_bytes`: per rank, already held by the group's other models."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    n = config.world_size
    weights = _weights(info, config)
    total = sum(p.numel * itemsize for p, itemsize in weights)
    if placement == "split":
        per_rank, gathered = _split_per_rank(weights, config, info.diffusers_config["num_layers"]), 0
    elif placement == "fsdp" and n > 1:
        per_rank = sum(_shard(p, itemsize, n) for p, itemsize in weights)
        gathered = _gathered(weights, n)
    else:  # fsdp over one rank holds the same bytes as replicated
        per_rank, gathered = total, 0
    activations = _activation_bytes(info, config, latent, batch) if latent is not None else 0
    budget = int(card_bytes * config.gpu_memory_fraction) if card_bytes is not None else None
    peak = per_rank + resident_bytes + gathered + activations
    return MemoryPlan(
        placement=placement, world_size=n, weight_bytes=total, weight_bytes_per_rank=per_rank,
        gathered_bytes=gathered, activation_bytes=activations, budget_bytes=budget, peak_bytes=peak,
        fits=budget is None or peak <= budget, resident_bytes=resident_bytes,
        gpu_memory_fraction=config.gpu_memory_fraction,
    )


def standard_latent(info: CheckpointInfo) -> tuple[tuple[int, int, int], str]:
    """(latent, video size) that "auto" plans for when no size is given: 720p for 14B-class models."""
    if info.dim >= 5120:
        return (21, 90, 160), "1280x720x81"
    return (21, 60, 104), "832x480x81"


def plan_load(info: CheckpointInfo, config: XDitUSPConfig, card_bytes: Optional[int],
              latent: Optional[tuple[int, int, int]] = None, batch: int = 2,
              resident_bytes: int = 0) -> MemoryPlan:
    """The plan to load `info`'s model with: `config.weight_sharding` "none" -> replicated, "fsdp"
    -> fsdp, "auto" -> replicated when that fits, else fsdp (planned for the model's standard size
    when `latent` is None; "none" and "fsdp" then count the weights alone).

    Raises `ConfigError` when the plan does not fit the budget, naming what would; a budget of
    None (CPU) never refuses."""
    size = None
    if config.weight_sharding == "auto" and latent is None:
        latent, size = standard_latent(info)

    def plan(placement: str, **changes) -> MemoryPlan:
        cfg = dataclasses.replace(config, **changes) if changes else config
        return estimate(info, cfg, placement, latent, batch, card_bytes, resident_bytes)

    if config.tensor_parallel_degree * config.pipeline_parallel_degree > 1:
        chosen = plan("split")  # the weights are split by the layout (fsdp with it is refused by validate)
    elif config.weight_sharding == "auto":
        chosen = plan("replicated")
        if not chosen.fits and config.world_size > 1:
            chosen = plan("fsdp")
    else:
        chosen = plan("fsdp" if config.weight_sharding == "fsdp" else "replicated")
    if not chosen.fits:
        planned = ("the weights alone (no video size given)" if latent is None else
                   f"latent {'x'.join(map(str, latent))}" + (f" ({size}, the model's standard size)" if size else "")
                   + f", batch {batch}")
        n_params = sum(p.numel for p in _model_params(info))
        held = ""
        if resident_bytes and config.weight_sharding != "fsdp":
            held = (f" {_gb(resident_bytes)} GB/GPU are held by models already loaded on this group (e.g. the other "
                    "Wan 2.2 expert): with weight_sharding='fsdp' every model on the group is sharded from its load.")
        raise ConfigError(f"the Wan {info.variant} model ({n_params / 1e9:.1f}B parameters) does not fit: "
                          f"{chosen.describe()}; planned for {planned}. {_what_fits(config, chosen, plan)}{held}")
    return chosen


def _what_fits(config: XDitUSPConfig, chosen: MemoryPlan, plan) -> str:
    """The settings that would fit, each at the smallest world size (automatic layout) that does."""

    def smallest_world(placement: str, weight_dtype: str) -> Optional[MemoryPlan]:
        for n in range(2 if placement == "fsdp" else 1, _MAX_WORLD_SIZE + 1):
            p = plan(placement, world_size=n, weight_dtype=weight_dtype, device_ids=None,
                     ulysses_degree=AUTO, ring_degree=AUTO, cfg_degree=AUTO, tensor_parallel_degree=1,
                     pipeline_parallel_degree=1, weight_sharding="fsdp" if placement == "fsdp" else "none")
            if p.fits:
                return p
        return None

    fits, misses = [], []
    for weight_dtype in dict.fromkeys((config.weight_dtype, "fp8_e4m3fn")):
        for placement, sharding in (("replicated", "none"), ("fsdp", "fsdp")):
            setting = f"weight_sharding={sharding!r}" + (
                f", weight_dtype={weight_dtype!r}" if weight_dtype != config.weight_dtype else "")
            p = smallest_world(placement, weight_dtype)
            if p:
                fits.append(f"{setting}, world_size={p.world_size} ({_gb(p.peak_bytes)} GB/GPU)")
            else:
                misses.append(setting)
    if fits:
        msg = f"On cards like these it fits with {'; '.join(fits)}."
        if misses:
            msg += f" Not with {' or '.join(misses)} on up to {_MAX_WORLD_SIZE} GPUs."
    else:
        msg = f"On cards like these it fits on no world_size up to {_MAX_WORLD_SIZE}."
    if config.gpu_memory_fraction < 1.0:
        whole = plan(chosen.placement, gpu_memory_fraction=1.0)
        return msg + (f" gpu_memory_fraction=1.0 ({_gb(whole.budget_bytes)} GB) "
                      + ("would fit this plan." if whole.fits else "would not be enough either."))
    return msg + " gpu_memory_fraction is already 1.0 (a lower one only shrinks the budget)."


def card_bytes(config: XDitUSPConfig) -> Optional[int]:
    """Total memory of the smallest of the config's GPUs; None for device "cpu"."""
    if config.device == "cpu":
        return None
    return min(torch.cuda.get_device_properties(i).total_memory for i in config.visible_device_ids())


# ---- a GPU shared with another process (ComfyUI) ------------------------------------------------
# ComfyUI's own process uses one GPU (VAE, text encoder) and a rank may run on the same one. Its
# memory manager frees room by the sizes models report, so what a rank holds there must be reported
# to it: these take plain numbers (the owner's cached MemoryStats, the plan), no process is asked.
def shared_rank(device_ids: list[int], index: Optional[int]) -> Optional[int]:
    """The rank whose GPU is CUDA device `index` (device_ids and index in one process's numbering,
    rank r on device_ids[r]), or None when no rank shares it."""
    return device_ids.index(index) if index is not None and index in device_ids else None


def shared_footprint(loaded: bool, params: int, peak_estimate: int, reserved: Optional[int] = None,
                     params_all: Optional[int] = None, forward_peak: Optional[int] = None) -> tuple[int, int]:
    """(size, held): one model's bytes on the GPU a rank shares, at its peak and now.

    loaded: the rank holds the model. params: the model's parameter bytes on that rank.
    peak_estimate: the plan's per-rank peak of the model alone (Loaded.peak_estimate). reserved:
    what the rank's caching allocator reserves now; params_all: the parameter bytes of every model
    on the rank (MemoryStats); None when not known. forward_peak: the rank's peak allocation in the
    model's last forward (ForwardDone.peak_bytes), None before the first.

    Not loaded: (the estimate, 0), what the load will take. Loaded: held is the model's parameters
    plus its share (by parameter bytes) of everything else the rank reserves (the cache the
    forwards leave, workspaces), so the models of one group add up to the rank's reserved bytes;
    size is the most of held and the peak (the last forward's, less the other models' parameters it
    counted; the estimate before the first forward), so size - held is the room a forward still
    needs on that GPU."""
    if not loaded:
        return max(peak_estimate, params), 0
    held = params
    if reserved is not None:
        params_all = max(params_all if params_all is not None else params, params)
        share = params / params_all if params_all else 1.0
        held = params + int(max(0, reserved - params_all) * share)
    if forward_peak is not None:
        peak = forward_peak - (max(params_all or params, params) - params)
    else:
        peak = peak_estimate
    return max(held, peak), held


def freed_bytes(before: Optional[int], after: Optional[int]) -> int:
    """What a trim gave back on a rank: its reserved bytes before less after (0 if unknown)."""
    if before is None or after is None:
        return 0
    return max(0, before - after)
