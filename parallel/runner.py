"""One rank's models: build, weights, placement, layout choice, row slicing, LoRA merge.

The worker (`worker.py`) owns the RPC loop, the heartbeat and the fault hook; this module owns
everything a model needs on a rank, vLLM-style (executor/worker/model runner):

    runner = ModelRunner(config, device)
    runner.load("high", path, info)                      -> protocol.Loaded
    rows, out, layout = runner.forward("high", inputs)   # inputs: protocol.ForwardInputs (full batch)
    runner.set_lora("high", {name: [(kind, [tensors], scale)]})

Where the weights live is a `Placement`: the seam that weight sharding (FSDP), tensor and pipeline
parallelism plug into. Every placement composes with every sequence-parallel layout, because the
layout only decides which rows and tokens a rank computes, and the placement only decides where
each parameter is held between uses.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional

import torch

from . import protocol
from .attention import SPGroup, build_sp_group
from .config import Layout, XDitUSPConfig
from .sp_wan import SequenceParallelWan


# ---- placements -------------------------------------------------------------------------------------
class Placement:
    """Where a model's parameters live on this rank.

    `materialize` turns a model built on the meta device into a working one from a stream of
    (diffusers name, tensor); `local_parameters` gives the tensors this rank holds, which a LoRA
    merge updates in place."""

    name = "placement"

    def materialize(self, model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]],
                    dtype_of, device: torch.device) -> torch.nn.Module:
        raise NotImplementedError

    def local_parameters(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class Replicated(Placement):
    """Every rank holds every parameter (weights streamed from the mmap, one tensor in host memory
    at a time)."""

    name = "replicated"

    def materialize(self, model, tensors, dtype_of, device):
        state = {}
        for name, t in tensors:
            if t.dtype.is_floating_point and t.element_size() == 1:  # plain fp8: upcast via fp32
                t = t.float()
            state[name] = t.to(device=device, dtype=dtype_of(name))
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device).eval().requires_grad_(False)

    def local_parameters(self, model):
        return {name: p.data for name, p in model.named_parameters()}


def _fp32_predicate(cls):
    """diffusers' own `_keep_in_fp32_modules` (rope, time embedder, modulation tables, norms)."""
    keep = set(getattr(cls, "_keep_in_fp32_modules", None) or ())
    return lambda name: any(part in keep for part in name.split("."))


# ---- models -----------------------------------------------------------------------------------------
@dataclass
class _Model:
    path: str
    info: object  # CheckpointInfo
    module: torch.nn.Module
    sp: SequenceParallelWan
    layouts: tuple[Layout, Layout]  # (configured, batch-1 fallback)
    patched: set[str] = field(default_factory=set)  # weights a LoRA changed (restored from `path` first)


class ModelRunner:
    def __init__(self, config: XDitUSPConfig, device: torch.device, placement: Optional[Placement] = None):
        self.config = config
        self.device = device
        self.dtype = config.torch_dtype()
        self.placement = placement or Replicated()
        self.models: dict[str, _Model] = {}
        self._groups: dict[Layout, SPGroup] = {}

    def group(self, layout: Layout) -> SPGroup:
        """The process groups of `layout` (created on first use: a collective on every rank)."""
        if layout not in self._groups:
            self._groups[layout] = build_sp_group(layout.cfg, layout.ulysses, layout.ring)
        return self._groups[layout]

    # ---- load / unload ------------------------------------------------------------------------
    def load(self, key: str, path: str, info) -> protocol.Loaded:
        import diffusers
        from accelerate import init_empty_weights

        from ..wan_to_xdit_mapping import iter_checkpoint

        t0 = time.perf_counter()
        cls = getattr(diffusers, info.diffusers_class)
        with init_empty_weights():
            module = cls(**info.diffusers_config)
        keep_fp32 = _fp32_predicate(cls)
        _, tensors = iter_checkpoint(path, info=info)
        module = self.placement.materialize(
            module, tensors, lambda name: torch.float32 if keep_fp32(name) else self.dtype, self.device)
        layout, fallback, backend = self.config.plan(info.num_heads)
        for lay in (layout, fallback):
            self.group(lay)
        self.models[key] = _Model(path, info, module, SequenceParallelWan(module, backend), (layout, fallback))
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        c = module.config
        return protocol.Loaded(
            load_s=time.perf_counter() - t0, backend=backend.name, layout=layout, fallback_layout=fallback,
            variant=info.variant, num_heads=info.num_heads, in_channels=c.in_channels, out_channels=c.out_channels,
            patch_size=list(c.patch_size), memory_bytes=torch.cuda.memory_allocated(self.device) if cuda else None,
        )

    def unload(self, key: str):
        self.models.pop(key, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _model(self, key: str) -> _Model:
        m = self.models.get(key)
        if m is None:
            raise KeyError(f"model {key!r} is not loaded (loaded: {sorted(self.models)})")
        return m

    # ---- forward ------------------------------------------------------------------------------
    def layout_for(self, key: str, batch: int) -> Layout:
        """The configured layout when the batch divides by its CFG degree, else the fallback."""
        layout, fallback = self._model(key).layouts
        return layout if batch % layout.cfg == 0 else fallback

    def forward(self, key: str, inputs: protocol.ForwardInputs
                ) -> tuple[slice, Optional[torch.Tensor], Layout]:
        """Run this rank's share of one forward. `inputs` is the whole batch (views are fine);
        returns (the batch rows this rank's CFG group computes, their output on the group leader
        or None elsewhere, the layout used)."""
        m = self._model(key)
        batch = inputs.batch
        layout = self.layout_for(key, batch)
        group = self.group(layout)
        per = batch // layout.cfg
        rows = slice(group.cfg_index * per, (group.cfg_index + 1) * per)
        mine = self._rows_on_device(inputs, rows, batch)
        return rows, m.sp.forward(group, mine), layout

    def _rows_on_device(self, inputs: protocol.ForwardInputs, rows: slice, batch: int) -> protocol.ForwardInputs:
        moved = {}
        for name, t in inputs.tensors().items():
            t = t[rows] if t.ndim and t.shape[0] == batch else t
            dtype = torch.float32 if name == "timestep" else self.dtype
            moved[name] = t.to(self.device, dtype=dtype, non_blocking=True)
        return replace(inputs, **moved)

    # ---- LoRA ---------------------------------------------------------------------------------
    def set_lora(self, key: str, patches: dict[str, list[tuple[str, list[torch.Tensor], float]]]) -> int:
        """Make `patches` the LoRA state of model `key`: {diffusers weight name: [(kind, tensors,
        scale)]}, kind "lora" (tensors = [up, down]: scale * up @ down, merged here from the
        low-rank factors) or "diff" (tensors = [delta]: scale * delta). {} removes every LoRA.

        Weights patched before are first restored exactly from the checkpoint file (only those
        tensors, through the shared page cache), so no second copy of the weights is kept on the
        device and a strength change never reloads the model."""
        from ..wan_to_xdit_mapping import iter_checkpoint, lora_delta

        m = self._model(key)
        params = self.placement.local_parameters(m.module)
        unknown = [n for n in patches if n not in params]
        if unknown:
            raise KeyError(f"LoRA targets {unknown[:5]}, which the model does not have")
        if m.patched:
            _, originals = iter_checkpoint(m.path, only=m.patched, info=m.info)
            for name, t in originals:
                params[name].copy_(t.to(self.device, params[name].dtype))
            m.patched = set()
        for name, items in patches.items():
            p = params[name]
            w = p.float()
            for kind, tensors, scale in items:
                tensors = [t.to(self.device, torch.float32) for t in tensors]
                if kind == "lora":
                    w += lora_delta({"up": tensors[0], "down": tensors[1]}, scale).reshape(p.shape)
                elif kind == "diff":
                    w += scale * tensors[0].reshape(p.shape)
                else:
                    raise ValueError(f"unknown LoRA patch kind {kind!r} for {name}")
            p.copy_(w.to(p.dtype))
            m.patched.add(name)
        return len(patches)
