"""One rank's models: build, weights, placement, layout choice, row slicing, weight patches.

The worker (`worker.py`) owns the RPC loop, the heartbeat and the fault hook; this module owns
everything a model needs on a rank, vLLM-style (executor/worker/model runner):

    runner = ModelRunner(config, device)
    runner.load("high", path, info, "fsdp")              -> protocol.Loaded
    rows, out, layout = runner.forward("high", inputs)   # inputs: protocol.ForwardInputs (full batch)
    runner.set_weight_patches("high", {name: [protocol.WeightPatch(...)]})

Where the weights live is a `Placement`: the seam that weight sharding (FSDP), tensor and pipeline
parallelism plug into. Every placement composes with every sequence-parallel layout, because the
layout only decides which rows and tokens a rank computes, and the placement only decides where
each parameter is held between uses.
"""
from __future__ import annotations

import gc
import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from . import linkprobe, protocol
from .attention import CommOptions, SPGroup, build_sp_group
from .config import Layout, XDitUSPConfig
from .sp_wan import SequenceParallelWan
from ..wan_to_xdit_mapping import fp32_predicate


# ---- placements -------------------------------------------------------------------------------------
class Placement:
    """Where a model's parameters live on this rank between uses.

    The runner builds the model on the meta device with each parameter in its storage dtype, then
    asks the placement to `place` it (wrap it, allocate this rank's storage on `device`) and fills
    that storage from the checkpoint, reading for every tensor only the `rows` this rank holds.
    `local_parameters` gives the tensors this rank holds under their diffusers names (views a
    LoRA merge updates in place), `rows` which rows of the full tensor each of them is."""

    name = "placement"

    def place(self, root: torch.nn.Module, units: list[torch.nn.Module], device: torch.device) -> None:
        raise NotImplementedError

    # The diffusers names of the parameters this rank holds (any part of); None: every one.
    held: Optional[set] = None

    def rows(self, name: str, shape: tuple):
        """The part of parameter `name` (full `shape`) this rank holds, as an index of the full tensor:
        None (all of it), a slice of dim 0 (rows), or a tuple of slices (e.g. `(slice(None), cols)`)."""
        return None

    def local_parameters(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {name: p.data for name, p in model.named_parameters()}


class Replicated(Placement):
    """Every rank holds every parameter."""

    name = "replicated"

    def place(self, root, units, device):
        _to_empty(root, device)


class FullyShard(Placement):
    """PyTorch FSDP2: every parameter split on dim 0 over all ranks of the group (CFG groups
    included), each unit (block, condition embedder, and the rest of the model as the root)
    gathered just before it runs and freed after; the next block's gather is issued when the
    current one starts, so it overlaps the current block's compute."""

    name = "fsdp"

    def __init__(self, device: torch.device):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.mesh = init_device_mesh(device.type, (self.world,))

    def place(self, root, units, device):
        try:
            from torch.distributed.fsdp import fully_shard  # public from torch 2.6
        except ImportError:
            raise RuntimeError(f"weight_sharding='fsdp' needs torch >= 2.6 (FSDP2); this is torch {torch.__version__}") from None
        for unit in units:
            fully_shard(unit, mesh=self.mesh, reshard_after_forward=True)
        fully_shard(root, mesh=self.mesh, reshard_after_forward=True)
        blocks = units[1:]  # after the condition embedder, in the order the forward runs them
        for current, upcoming in zip(blocks, blocks[1:]):
            current.set_modules_to_forward_prefetch([upcoming])
        _to_empty(root, device)

    def rows(self, name, shape):
        if not shape:
            return None
        per = -(-shape[0] // self.world)  # torch.chunk, as FSDP2 splits dim 0
        start = min(self.rank * per, shape[0])
        return slice(start, min(start + per, shape[0]))

    def local_parameters(self, model):
        return {name: p.to_local() if hasattr(p, "to_local") else p.data for name, p in model.named_parameters()}


class TensorPipeline(Placement):
    """Tensor and pipeline parallelism (parallel/model_parallel.py): this rank holds its pipeline
    stage's blocks (and what that stage runs outside them), and of each block's attention and FFN
    Linears its tensor rank's heads / hidden units (rows of column-parallel weights, columns of
    row-parallel ones). `place` swaps the meta parameters for ones of the local shape, makes the q/k
    norms `TensorParallelRMSNorm`, hooks the reduce-scatter onto the row-parallel Linears and the
    all-gather of the sequence shard before cross-attention's q and the FFN, and sets each
    attention's head count to its local one; blocks of other stages become `_HeldElsewhere`."""

    name = "split"

    def __init__(self, group: SPGroup):
        self.group = group
        self.parts: dict[str, object] = {}
        self.held = set()

    def place(self, root, units, device):
        from . import model_parallel as mp

        g, model = self.group, root.model
        layers = len(model.blocks)
        root.pipeline_blocks = mp.stage_blocks(layers, g.pipeline, g.stage)
        if g.pipeline > 1:
            for i in range(layers):
                if i not in root.pipeline_blocks:
                    model.blocks[i] = _HeldElsewhere(i, g.stage)
            if g.stage != 0:
                model.patch_embedding = None
                if hasattr(model, "vace_blocks"):
                    model.vace_blocks, model.vace_patch_embedding = torch.nn.ModuleList(), None
            if g.stage != g.pipeline - 1:
                model.proj_out, model.scale_shift_table = None, None
        if g.tensor > 1:
            blocks = [b for b in model.blocks if not isinstance(b, _HeldElsewhere)]
            prefixes = {id(b): f"blocks.{i}" for i, b in enumerate(model.blocks)}
            for i, b in enumerate(getattr(model, "vace_blocks", None) or []):
                prefixes[id(b)] = f"vace_blocks.{i}"
                blocks.append(b)
            for block in blocks:
                self._split_block(block, prefixes[id(block)])
        self.held = {name for name, _ in model.named_parameters()}
        _to_empty(root, device)

    def _split_block(self, block, prefix):
        from . import model_parallel as mp

        g = self.group
        for attn_name in ("attn1", "attn2"):
            attn = getattr(block, attn_name)
            for lin in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj"):
                if getattr(attn, lin, None) is not None:
                    self._column(getattr(attn, lin), f"{prefix}.{attn_name}.{lin}")
            for norm in ("norm_q", "norm_k", "norm_added_k"):
                mod = getattr(attn, norm, None)
                if isinstance(mod, torch.nn.RMSNorm):
                    full = mod.weight.shape[0]
                    self._local(mod, "weight", f"{prefix}.{attn_name}.{norm}.weight")
                    mod.__class__ = mp.TensorParallelRMSNorm
                    mod.tp_pg, mod.full_dim = g.tp_pg, full
                    mod.normalized_shape = tuple(mod.weight.shape)
                elif mod is not None and not isinstance(mod, torch.nn.Identity):
                    raise ValueError(f"tensor parallel: {prefix}.{attn_name}.{norm} is a {type(mod).__name__}; "
                                     "only Wan's RMSNorm across heads is split")
            self._row(attn.to_out[0], f"{prefix}.{attn_name}.to_out.0")
            if attn.heads % g.tensor:
                raise ValueError(f"{attn.heads} heads do not split over tensor_parallel_degree {g.tensor}")
            attn.heads //= g.tensor
        self._column(block.ffn.net[0].proj, f"{prefix}.ffn.net.0.proj")
        self._row(block.ffn.net[2], f"{prefix}.ffn.net.2")
        # the stream is sequence-sharded across the tensor ranks: these two read the normed shard
        # (self-attention gathers it once for q, k and v: sp_wan.USPSelfAttnProcessor.attend)
        for lin in (block.attn2.to_q, block.ffn.net[0].proj):
            lin._xdit_tp_pg, lin._xdit_tp = g.tp_pg, g.tensor
            lin.register_forward_pre_hook(mp.gather_input)

    def _local(self, module, attr, name):
        """Replace `module.attr` (meta) with this rank's part of it."""
        from . import model_parallel as mp

        p = getattr(module, attr)
        part = mp.tp_part(name, tuple(p.shape), self.group.tensor, self.group.tp_rank)
        self.parts[name] = part
        shape = mp.part_shape(tuple(p.shape), part)
        setattr(module, attr, torch.nn.Parameter(torch.empty(shape, dtype=p.dtype, device="meta"), requires_grad=False))

    def _column(self, lin, name):
        self._local(lin, "weight", f"{name}.weight")
        for attr in ("bias", "row_scale"):  # row_scale: Fp8MatmulLinear's scale per output row
            if getattr(lin, attr, None) is not None:
                self._local(lin, attr, f"{name}.{attr}")
        lin.out_features = lin.weight.shape[0]

    def _row(self, lin, name):
        from . import model_parallel as mp

        self._local(lin, "weight", f"{name}.weight")
        lin.in_features = lin.weight.shape[1]
        if lin.bias is not None and self.group.tp_rank != 0:
            lin.bias = None  # added once, by tensor rank 0, before the reduce-scatter
        lin._xdit_tp_pg, lin._xdit_tp = self.group.tp_pg, self.group.tensor
        lin.register_forward_hook(mp.reduce_scatter_output)

    def rows(self, name, shape):
        return self.parts.get(name)


class _HeldElsewhere(torch.nn.Module):
    """A block another pipeline stage holds."""

    def __init__(self, index: int, stage: int):
        super().__init__()
        self.index, self.stage = index, stage

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"block {self.index} is held by another pipeline stage, not stage {self.stage}")


def _to_empty(module: torch.nn.Module, device: torch.device):
    """Allocate every parameter (uninitialised) on `device`; buffers keep their values (diffusers
    computes RoPE tables at construction, which `init_empty_weights` leaves on the CPU)."""
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    module.to_empty(device=device)
    for name, b in buffers.items():
        module.get_buffer(name).copy_(b)


def _units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules a sharded placement gathers one at a time: the condition embedder, then every
    block in the order the forward runs them (VACE blocks first)."""
    vace = list(getattr(model, "vace_blocks", None) or [])
    return [model.condition_embedder] + vace + list(model.blocks)


class CastLinear(torch.nn.Linear):
    """A Linear whose weight is stored in fp8 (and, for a scaled-fp8 file, with its `weight_scale`)
    and upcast to the input's dtype each time the layer runs: the arithmetic of dequantising the
    weight at load (`weight.float() * scale`, then the compute dtype), at half the resident bytes."""

    weight_scale: Optional[torch.Tensor]

    def forward(self, x):
        w = self.weight
        if self.weight_scale is not None:
            scale = self.weight_scale
            w = w.float() * (scale.reshape(-1, 1) if scale.numel() > 1 else scale)
        return torch.nn.functional.linear(x, w.to(x.dtype), self.bias)


class Fp8MatmulLinear(CastLinear):
    """A Linear that multiplies in fp8 (config.fp8_matmul, ComfyUI's "fp8_e4m3fn_fast").

    The weight is held as e4m3 with one fp32 scale per output row (`row_scale`, a parameter beside
    the weight, so a sharded placement splits it with the weight's rows): row r is stored as
    W[r] / row_scale[r], row_scale[r] = max |W[r]| / 448, so every row uses e4m3's whole range (an
    unscaled cast, as ComfyUI's fp8 storage does, leaves Wan's small weights in e4m3's subnormals).
    The input is quantised to e4m3 per token (scale = the token's max |x| / 448) and one
    `torch._scaled_mm` multiplies with fp32 accumulation, both scales applied in its epilogue.
    Where row-wise scales are not supported by `_scaled_mm` (`rowwise` False: probed at load, e.g.
    older torch on the CPU), the input gets one scale for the whole tensor and the row scales are
    applied to the fp32 product. Not exact: the rounding of weights and inputs to 3 mantissa bits is
    the cost of the faster matmul (measured in BENCHMARKS.md). In compiled blocks the quantisation
    fuses with the operation before it."""

    row_scale: torch.nn.Parameter
    rowwise: bool = True

    def forward(self, x):
        fmax = torch.finfo(torch.float8_e4m3fn).max
        tiny = torch.finfo(torch.float32).tiny
        x2 = x.reshape(-1, x.shape[-1])
        w_scale = self.row_scale.reshape(1, -1)
        amax = x2.abs().amax(dim=1, keepdim=True) if self.rowwise else x2.abs().amax()  # per token, or one
        scale_a = (amax.float() / fmax).clamp(min=tiny)
        xq = (x2.float() / scale_a).clamp(-fmax, fmax).to(torch.float8_e4m3fn)
        if self.rowwise:
            out = torch._scaled_mm(xq, self.weight.t(), scale_a=scale_a, scale_b=w_scale, out_dtype=x.dtype)
        else:
            one = scale_a.new_ones(())
            out = (torch._scaled_mm(xq, self.weight.t(), scale_a=scale_a, scale_b=one, out_dtype=torch.float32)
                   * w_scale).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, fp32 row scales) of a 2-D fp32 weight: Fp8MatmulLinear's storage."""
    fmax = torch.finfo(torch.float8_e4m3fn).max
    scale = (w.abs().amax(dim=1) / fmax).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale[:, None]).clamp(-fmax, fmax).to(torch.float8_e4m3fn), scale


_ROWWISE: dict[str, bool] = {}


def rowwise_scaled_mm(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` takes row-wise scales on `device` (cuBLASLt/CUTLASS on Hopper and
    Ada with a recent torch; the CPU from torch 2.10 or so): probed once per device type."""
    key = str(device)
    if key not in _ROWWISE:
        a = torch.zeros(16, 16, device=device).to(torch.float8_e4m3fn)
        try:
            torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=device), scale_b=torch.ones(1, 16, device=device),
                             out_dtype=torch.bfloat16)
            _ROWWISE[key] = True
        except (RuntimeError, NotImplementedError):
            _ROWWISE[key] = False
    return _ROWWISE[key]


_FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def storage_dtypes(model: torch.nn.Module, cls, compute: torch.dtype, weight_dtype: str,
                   stored: dict[str, tuple]) -> tuple[dict[str, torch.dtype], set[str]]:
    """How each parameter is held between uses: ({diffusers name: dtype}, {names kept as the file's
    scaled fp8 with their scale}). fp32 for what diffusers keeps in fp32; Linear weights in fp8
    when `weight_dtype` asks for it or when the file stores them in fp8 (`stored`: from
    `wan_to_xdit_mapping.stored_tensors`); the compute dtype for everything else. A scaled-fp8
    weight keeps its bytes and its scale when the scale is one number."""
    keep_fp32 = fp32_predicate(cls)
    linear = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    dtypes, scaled = {}, set()
    for name, _ in model.named_parameters():
        _, file_dtype, scale_shape = stored[name]
        file_fp8 = file_dtype.startswith("float8")
        if keep_fp32(name):
            dtypes[name] = torch.float32
        elif name in linear and (weight_dtype in _FP8 or file_fp8):
            dtypes[name] = _FP8.get(weight_dtype) or getattr(torch, file_dtype)
            if file_fp8 and dtypes[name] == getattr(torch, file_dtype) and scale_shape is not None:
                if math.prod(scale_shape) == 1:
                    scaled.add(name)
                elif weight_dtype not in _FP8:  # a per-row scale: dequantised to the compute dtype
                    dtypes[name] = compute
        else:
            dtypes[name] = compute
    return dtypes, scaled


def _set_storage(model: torch.nn.Module, dtypes: dict[str, torch.dtype], scaled: set[str], fp8_matmul: bool = False):
    """Give every (meta) parameter its storage dtype; Linears with an fp8 weight become CastLinear
    (with a `weight_scale` buffer when the file's weights are scaled fp8), or with `fp8_matmul`,
    those of the transformer blocks with an e4m3 weight become Fp8MatmulLinear."""
    for name, dtype in dtypes.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        p = getattr(owner, attr)
        if p.dtype != dtype:
            setattr(owner, attr, torch.nn.Parameter(torch.empty_like(p, dtype=dtype, device="meta"), requires_grad=False))
        if attr == "weight" and isinstance(owner, torch.nn.Linear) and dtype.itemsize == 1:
            in_block = name.split(".")[0] in ("blocks", "vace_blocks")
            if fp8_matmul and in_block and dtype == torch.float8_e4m3fn:
                owner.__class__ = Fp8MatmulLinear  # a file's scale, if any, goes into its row scales
                owner.register_buffer("weight_scale", None)
                owner.row_scale = torch.nn.Parameter(torch.empty(p.shape[0], device="meta"), requires_grad=False)
            else:
                owner.__class__ = CastLinear
                owner.register_buffer("weight_scale", torch.ones(()) if name in scaled else None)


# ---- models -----------------------------------------------------------------------------------------
@dataclass
class _Model:
    path: str
    info: object  # CheckpointInfo
    sp: SequenceParallelWan  # the root module; the diffusers model is sp.model
    placement: Placement
    scaled: set[str]  # weights held as the file's scaled fp8 (their scale in the Linear's weight_scale)
    layouts: tuple[Layout, Layout]  # (configured, batch-1 fallback)
    shape: Optional[linkprobe.ModelShape] = None  # set when `auto` chooses by the link probe, per forward
    ring_ok: bool = True  # the attention kernel returns a log-sum-exp (ring layouts may be chosen)
    choices: dict = field(default_factory=dict)  # (batch, tokens) -> Layout, the cost model's choices so far
    patched: set[str] = field(default_factory=set)  # weights a patch changed (restored from `path` first)
    param_bytes: int = 0  # what this rank holds of it between forwards
    shapes: dict = field(default_factory=dict)  # every parameter's full shape (diffusers name), held here or not

    @property
    def module(self) -> torch.nn.Module:
        return self.sp.model


class ModelRunner:
    def __init__(self, config: XDitUSPConfig, device: torch.device):
        self.config = config
        self.device = device
        self.dtype = config.torch_dtype()
        self.models: dict[str, _Model] = {}
        self.uni3c: Optional[tuple] = None  # (key, uni3c.Uni3CNet): Uni3C's control net, held replicated
        self.audio = None  # sp_audio.AudioPatch the group holds (one at a time; protocol.AudioLoad)
        self._groups: dict[Layout, SPGroup] = {}
        self._fsdp: Optional[FullyShard] = None
        self.trims = 0  # calls of trim(), reported in protocol.MemoryStats
        self._infos: dict = {}  # (path, mtime, size) -> CheckpointInfo of files merged in (set_weight_patches)
        self.link: Optional[linkprobe.LinkProbe] = None  # measured at the first load (a collective)

    @property
    def comm(self) -> CommOptions:
        """How the sequence ranks exchange q/k/v: the config's, `comm_overlap='auto'` decided by the link
        probe once the group has measured it (before: overlapped)."""
        return CommOptions.from_config(self.config, self.link)

    def group(self, layout: Layout) -> SPGroup:
        """The process groups of `layout` (created on first use: a collective on every rank)."""
        if layout not in self._groups:
            self._groups[layout] = build_sp_group(layout.cfg, layout.ulysses, layout.ring, layout.tensor, layout.pipeline,
                                                  comm=self.comm)
        return self._groups[layout]

    def placement(self, name: str, layout: Optional[Layout] = None) -> Placement:
        if name == "split":
            return TensorPipeline(self.group(layout))
        if name == "fsdp":
            if self._fsdp is None:  # one device mesh for every sharded model
                self._fsdp = FullyShard(self.device)
            return self._fsdp
        if name == "replicated":
            return Replicated()
        raise ValueError(f"unknown placement {name!r}; known: 'replicated', 'fsdp', 'split'")

    # ---- load / unload ------------------------------------------------------------------------
    def load(self, key: str, path: str, info, placement: str = "replicated") -> protocol.Loaded:
        """Build model `key` from `path` on the meta device, place it, and fill this rank's share
        of every parameter from the memory-mapped file."""
        import diffusers
        from accelerate import init_empty_weights

        from ..wan_to_xdit_mapping import iter_weights, stored_tensors

        t0 = time.perf_counter()
        cls = getattr(diffusers, info.diffusers_class)
        with init_empty_weights():
            module = cls(**info.diffusers_config)
        module.requires_grad_(False)
        stored = stored_tensors(path, info)
        dtypes, scaled = storage_dtypes(module, cls, self.dtype, self.config.storage_weight_dtype, stored)
        _set_storage(module, dtypes, scaled, fp8_matmul=self.config.fp8_matmul)
        layout, fallback, backend = self.config.plan(info.num_heads)
        if (layout.tensor > 1 or layout.pipeline > 1) != (placement == "split"):
            raise ValueError(f"placement {placement!r} for layout {layout}: tensor / pipeline degrees need 'split'")
        if layout.pipeline > len(module.blocks):
            raise ValueError(f"pipeline_parallel_degree {layout.pipeline} is more than the model's {len(module.blocks)} blocks")
        param_bytes_total = sum(p.numel() * p.element_size() for p in module.parameters())
        shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
        root = SequenceParallelWan(module, backend).eval()
        place = self.placement(placement, layout)
        place.place(root, _units(module), self.device)
        local = place.local_parameters(module)
        held = None if place.held is None else place.held & set(stored)  # (row_scale is made here, not read)
        _, weights = iter_weights(path, info=info, rows=place.rows, only=held)
        for name, w, scale in weights:
            self._fill(module, local, name, w, scale, name in scaled)
        rowwise = self.config.fp8_matmul and rowwise_scaled_mm(self.device)
        if self.config.fp8_matmul:
            for mod in module.modules():
                if isinstance(mod, Fp8MatmulLinear):
                    mod.rowwise = rowwise
        for lay in (layout, fallback):
            self.group(lay)
        if self.link is None:
            self.link = linkprobe.probe(self.device, self.dtype, backend)
            for g in self._groups.values():  # made before the link was known
                g.comm = self.comm
        param_bytes = _nbytes(local.values())
        m = _Model(path, info, root, place, scaled, (layout, fallback), param_bytes=param_bytes, shapes=shapes)
        choice = {"rule": "configured"}
        if linkprobe.by_probe(self.config) and self.config.world_size > 1:
            from .memory import standard_latent

            latent, size = standard_latent(info)
            m.shape, m.ring_ok = linkprobe.ModelShape.of(module.config), backend.lse is not None
            tokens = linkprobe.tokens_of(latent, module.config.patch_size)
            costs = {}
            for b in (2, 1):
                costs[b] = self._choose(m, b, tokens)[1]
            m.layouts = layout, fallback = self._choose(m, 2, tokens)[0], self._choose(m, 1, tokens)[0]
            choice = {"rule": "cost model", "size": size, "predicted_s": costs}
        elif not (self.config.ulysses_degree or self.config.ring_degree or self.config.cfg_degree):
            choice = {"rule": "static"}
        if self.config.world_size > 1:
            choice["comm_overlap"] = self.comm.overlap  # what `comm_overlap` (auto: the link) decided
        self.models[key] = m
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        del weights, local
        self.trim()  # what building and filling left in the allocator's cache (staging copies, fp8 rounding)
        c = module.config
        return protocol.Loaded(
            load_s=time.perf_counter() - t0, backend=backend.name, layout=layout, fallback_layout=fallback,
            variant=info.variant, num_heads=info.num_heads, in_channels=c.in_channels, out_channels=c.out_channels,
            patch_size=list(c.patch_size), memory_bytes=torch.cuda.memory_allocated(self.device) if cuda else None,
            placement=place.name, param_bytes=param_bytes, compiled=self.config.compile,
            fp8_matmul=self.config.fp8_matmul,
            fp8_input_scaling=("token" if rowwise else "tensor") if self.config.fp8_matmul else "",
            param_bytes_total=param_bytes_total,
            link=self.link.as_dict(), layout_choice=choice,
        )

    def _fill(self, module, params: dict[str, torch.Tensor], name: str, w: torch.Tensor, scale, keep_scaled: bool):
        """Copy one stored tensor (this rank's rows of it) into its parameter storage `params[name]`
        (any dequantising or fp8 rounding happens on the device, after the copy of the stored bytes).
        An Fp8MatmulLinear's weight is quantised with its row scales, written into `row_scale`."""
        local = params[name]
        w = w.to(local.device)
        owner_name = name.rpartition(".")[0]
        owner = module.get_submodule(owner_name)
        if isinstance(owner, Fp8MatmulLinear) and name.endswith(".weight"):
            row_scale = params[f"{owner_name}.row_scale"]
            if keep_scaled:  # the file's fp8 bytes as they are, its one scale for every row
                row_scale.copy_(scale.reshape(()).to(row_scale.device).expand_as(row_scale))
            else:
                w, s = quantize_rows(_dequantised(w, scale))
                row_scale.copy_(s)
        elif keep_scaled:  # the file's fp8 bytes as they are, and the scale next to them
            owner.weight_scale.copy_(scale.reshape(()))
        elif scale is not None or (w.dtype.itemsize == 1) != (local.dtype.itemsize == 1):
            w = _dequantised(w, scale)
            if local.dtype.itemsize == 1:
                w = w.clamp(-torch.finfo(local.dtype).max, torch.finfo(local.dtype).max)
        if tuple(w.shape) != tuple(local.shape):
            raise RuntimeError(f"{name}: read {tuple(w.shape)} for a local shard of {tuple(local.shape)}")
        local.copy_(w)

    def unload(self, key: str):
        self.models.pop(key, None)
        self.trim()

    def trim(self, collect: bool = True):
        """Give back what the caching allocator holds and no tensor uses (a no-op on the CPU):
        collect cycles first (`collect`: a full gc.collect(), ~0.25 s in a worker), so tensors only
        a cycle kept alive are released too."""
        if collect:
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.trims += 1

    def param_bytes(self) -> int:
        """Parameter bytes of every model this rank holds."""
        return sum(m.param_bytes for m in self.models.values()) + self.uni3c_param_bytes() + \
            (self.audio.param_bytes if self.audio else 0)

    def audio_load(self, key: str, tensors: dict, num_heads: int, eps: float):
        """Hold an audio patch's per-block weights (InfiniteTalk), replacing the one held before."""
        from .sp_audio import AudioPatch

        self.audio = None
        self.audio = AudioPatch(key, tensors, num_heads, eps, self.device, self.dtype)
        self.trim()

    def _model(self, key: str) -> _Model:
        m = self.models.get(key)
        if m is None:
            raise KeyError(f"model {key!r} is not loaded (loaded: {sorted(self.models)})")
        return m

    # ---- forward ------------------------------------------------------------------------------
    def layout_for(self, key: str, batch: int, tokens: Optional[int] = None) -> Layout:
        """With every degree `auto` on GPUs: the cost model's fastest layout for this batch and token
        count (linkprobe.choose; every rank computes the same from the same probe). Otherwise the
        configured layout when the batch divides by its CFG degree, else the fallback."""
        m = self._model(key)
        if m.shape is not None and tokens:
            return self._choose(m, batch, tokens)[0]
        layout, fallback = m.layouts
        return layout if batch % layout.cfg == 0 else fallback

    def _choose(self, m: _Model, batch: int, tokens: int) -> tuple[Layout, dict]:
        if (batch, tokens) not in m.choices:
            m.choices[batch, tokens] = linkprobe.choose(
                m.shape, self.link, batch, tokens, ring_ok=m.ring_ok, itemsize=self.dtype.itemsize,
                overlap=self.comm.overlap)
        return m.choices[batch, tokens]

    def forward(self, key: str, inputs: protocol.ForwardInputs
                ) -> tuple[slice, Optional[torch.Tensor], Layout]:
        """Run this rank's share of one forward. `inputs` is the whole batch (views are fine);
        returns (the batch rows this rank's CFG group computes, their output on the group leader
        or None elsewhere, the layout used)."""
        m = self._model(key)
        batch = inputs.batch
        layout = self.layout_for(key, batch, linkprobe.tokens_of(inputs.hidden_states.shape[2:],
                                                                 m.module.config.patch_size))
        if inputs.uni3c is not None and self.uni3c is not None and self.uni3c[1].num_heads % layout.ulysses:
            # the cost model's pick splits heads Uni3C's control net cannot split: the layouts set at load
            # instead (m.layouts: the configured ones, or the cost model's at the standard size when
            # every degree is auto), which the owner checked (launcher._check_uni3c); every rank decides the same
            layout = m.layouts[0] if batch % m.layouts[0].cfg == 0 else m.layouts[1]
        group = self.group(layout)
        per = batch // layout.cfg
        rows = slice(group.cfg_index * per, (group.cfg_index + 1) * per)
        mine = self._rows_on_device(inputs, rows, batch)
        uni3c = self._uni3c_call(inputs, rows) if inputs.uni3c is not None else None
        audio = self.audio if inputs.audio_key is not None else None
        return rows, m.sp(group, mine, uni3c=uni3c, audio=audio), layout

    # ---- Uni3C camera control (parallel/uni3c.py) ------------------------------------------------
    def uni3c_load(self, key: str, config: dict, tensors: dict):
        """Hold the Uni3C control net `key` (replacing any other: one per group), replicated."""
        from .uni3c import build

        if self.uni3c is not None and self.uni3c[0] == key:
            return
        self.uni3c = None
        self.uni3c = (key, build(config, tensors, self.device, self.dtype))

    def uni3c_param_bytes(self) -> int:
        if self.uni3c is None:
            return 0
        return sum(p.numel() * p.element_size() for p in self.uni3c[1].parameters())

    def _uni3c_call(self, inputs: protocol.ForwardInputs, rows: slice):
        """This CFG group's Uni3C work: the control rows its batch rows use (row r uses control row
        r % n, as WanUni3CCnetPatch repeats one cond's residual over the others), each computed once."""
        from .uni3c import Uni3CCall

        key = inputs.uni3c.get("key")
        if self.uni3c is None or self.uni3c[0] != key:
            raise KeyError(f"Uni3C control net {key!r} is not loaded on this group (uni3c_load it first)")
        control = inputs.uni3c_input
        n = control.shape[0]
        need = [r % n for r in range(rows.start, rows.stop)]
        distinct = sorted(set(need))
        pick = torch.tensor(distinct)
        timestep = inputs.timestep[pick] if inputs.timestep.ndim else inputs.timestep.reshape(1).expand(len(distinct))
        return Uni3CCall(
            net=self.uni3c[1],
            control=control[pick].to(self.device, dtype=self.dtype),
            timestep=timestep.to(self.device, dtype=torch.float32),
            index=torch.tensor([distinct.index(r) for r in need], device=self.device),
            strength=float(inputs.uni3c.get("strength", 1.0)),
        )

    def stream_tokens(self, key: str) -> int:
        """Tokens of a batch row between blocks on this rank in model `key`'s last forward: its
        sequence shard, of that its tensor rank's run (0 on a stage that ran no block)."""
        return self._model(key).sp.stream_tokens

    def _rows_on_device(self, inputs: protocol.ForwardInputs, rows: slice, batch: int) -> protocol.ForwardInputs:
        moved = {}
        for name, t in inputs.tensors().items():
            if name == "uni3c_input":
                continue  # _uni3c_call moves only the control rows this group's batch rows use
            if name not in protocol.ForwardInputs.SHARED:  # moved whole: the audio tokens and masks
                t = t[rows] if t.ndim and t.shape[0] == batch else t
            dtype = torch.float32 if name == "timestep" else self.dtype
            moved[name] = t.to(self.device, dtype=dtype, non_blocking=True)
        return replace(inputs, **moved)

    # ---- weight patches (LoRA, merges, strength_model, set) ---------------------------------------
    def set_weight_patches(self, key: str, patches: dict[str, list[protocol.WeightPatch]]) -> int:
        """Make `patches` the weight patches of model `key`: {diffusers weight name: [WeightPatch]}
        (tensors as torch tensors), applied in order as comfy.lora.calculate_weight applies
        ComfyUI's patch entries: W <- strength_model * W, then the patch (protocol.WeightPatch),
        all in fp32, rounded once to the weight's storage dtype. {} restores every weight.

        Each rank patches the rows it holds: only `up`'s rows of a LoRA on a sharded weight are
        multiplied out, and a merge reads only its rows of the second checkpoint (its page cache is
        shared). Weights patched before are first restored exactly from the checkpoint file (only
        those tensors and rows), so no second copy of the weights is kept on the device and a
        strength change never reloads the model. A weight held in fp8 is patched in fp32 and
        rounded back to fp8, as ComfyUI does for fp8 weights. Returns how many weights changed."""
        from ..wan_to_xdit_mapping import iter_weights

        m = self._model(key)
        params = m.placement.local_parameters(m.module)
        unknown = [n for n in patches if n not in m.shapes]
        if unknown:
            raise KeyError(f"weight patches target {unknown[:5]}, which the model does not have")
        patches = {n: items for n, items in patches.items() if n in params}  # not on this rank: another's
        if m.patched:
            _, originals = iter_weights(m.path, only=m.patched, info=m.info, rows=m.placement.rows)
            for name, w, scale in originals:
                self._fill(m.module, params, name, w, scale, name in m.scaled)
            m.patched = set()
        for name, items in patches.items():
            m.patched.add(name)  # first: a patch that fails half-way is still restored by the next call
            p = params[name]
            full_shape = m.shapes[name]
            part = m.placement.rows(name, full_shape) or slice(None)
            owner_name = name.rpartition(".")[0]
            row_scale = params.get(f"{owner_name}.row_scale") if name.endswith(".weight") else None
            scale = m.module.get_submodule(owner_name).weight_scale if name in m.scaled and row_scale is None else None
            if row_scale is not None:  # Fp8MatmulLinear: dequantise by rows, patch, quantise with new row scales
                w = p.float() * row_scale[:, None]
            else:
                w = p.float() if scale is None else p.float() * scale
            # a merged-in weight is held as this one is (ComfyUI holds both models in its dtype)
            w = self._patched(w, items, name, full_shape, part, p.dtype if p.dtype.itemsize > 1 else torch.float32)
            if row_scale is not None:
                w, s = quantize_rows(w)
                row_scale.copy_(s)
            else:
                if scale is not None:
                    w = w / scale
                if p.dtype.itemsize == 1:
                    w = w.clamp(-torch.finfo(p.dtype).max, torch.finfo(p.dtype).max)
            p.copy_(w.to(p.dtype))
        return len(patches)

    def _patched(self, w: torch.Tensor, items: list, name: str, full_shape: tuple, part: slice,
                 held: torch.dtype) -> torch.Tensor:
        """`w` (fp32, this rank's rows `part` of weight `name`, may be modified) after `items`."""
        from ..wan_to_xdit_mapping import lora_delta

        for item in items:
            if item.strength_model != 1.0:
                w = w.mul_(item.strength_model)
            kind, strength = item.kind, item.strength
            if kind == "set":
                w = w.copy_(item.tensors[0].to(self.device, torch.float32).reshape(full_shape)[part])
                continue
            if strength == 0.0:
                continue
            if kind == "lora":
                up, down = (t.to(self.device, torch.float32) for t in item.tensors)
                if isinstance(part, tuple):  # columns of the weight: the same columns of `down`
                    down = down.reshape(down.shape[0], *full_shape[1:])[(slice(None), *part[1:])]
                else:
                    up = up.reshape(full_shape[0], -1)[part]
                w += lora_delta({"up": up, "down": down}, strength).reshape(w.shape)
            elif kind == "diff":
                w += strength * item.tensors[0].to(self.device, torch.float32).reshape(full_shape)[part]
            elif kind == "weight":
                other = self._read_rows(item.path, item.name, part, tuple(w.shape)).to(held).float()
                w += strength * self._patched(other, item.patches, name, full_shape, part, held)
            else:
                raise ValueError(f"unknown weight patch kind {kind!r} for {name}")
        return w

    def _read_rows(self, path: str, name: str, part: slice, shape: tuple) -> torch.Tensor:
        """Rows `part` of tensor `name` (diffusers name) of the checkpoint at `path`, dequantised
        to fp32 on this rank's device (`shape`: what this rank holds of the weight it patches): the
        second model of a merge, read as a model is loaded."""
        from ..wan_to_xdit_mapping import iter_weights

        st = os.stat(path)
        cache = (path, st.st_mtime_ns, st.st_size)
        info = self._infos.get(cache)
        if info is None:  # read and checked once per file (the header; no tensor data)
            info = self._infos[cache] = iter_weights(path, only=())[0]
        rows = None if part == slice(None) else (lambda n, s: part)
        _, it = iter_weights(path, only=(name,), info=info, rows=rows)
        for _n, t, scale in it:
            if tuple(t.shape) != shape:
                raise ValueError(f"{path}: rows {part} of {name} have shape {tuple(t.shape)}; the patched weight's are {shape}")
            return _dequantised(t.to(self.device), scale)
        raise KeyError(f"{path} has no tensor {name}")


def _dequantised(w: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """A stored tensor in fp32 on its device, times its file's scale (one per tensor, or one per row
    of dim 0), if it has one."""
    w = w.float()
    if scale is None:
        return w
    scale = scale.to(w.device, torch.float32)
    return w * (scale.reshape(-1, *[1] * (w.ndim - 1)) if scale.numel() > 1 else scale)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
