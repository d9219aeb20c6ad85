"""The MODEL our loader returns: a native ComfyUI Wan model whose transformer runs on a worker group.

Imported only inside ComfyUI (it subclasses ComfyUI classes). What ComfyUI sees:

  XDitUSPModelPatcher (a comfy.model_patcher.ModelPatcher)
    .model = the native comfy.model_base class ComfyUI's own detection picks for the checkpoint
             (WAN21 T2V/I2V, WAN21_Vace, WAN22 ...), so model_sampling, concat_cond, extra_conds and
             process_timestep are ComfyUI's; only memory_required() is replaced (the weights live in
             the workers, so the ComfyUI-side cost of a call is its input and output tensors).
      .diffusion_model = XDitUSPWanProxy: the native WanModel's module tree on the meta device (no
             memory; state_dict() has every `diffusion_model.<original Wan key>` so LoRA keys map),
             whose forward takes the native Wan arguments and runs one forward on the worker group.

ComfyUI's own ModelPatcher.load (always as a full load) / partially_load / unpatch_model / detach
run on it: no module of this process holds a weight for them to move or patch. Its sizes are what
a rank on ComfyUI's GPU holds, and partially_unload trims the ranks' caches (see
XDitUSPModelPatcher). The worker side hangs on ComfyUI's patcher callbacks (CallbacksMP): ON_LOAD
loads the model on the workers if needed and sends the patcher's weight patches
(group.set_weight_patches: LoRAs as low-rank factors, merges with a model of ours as the path of its
file, strength_model, diff and set patches), so a LoRA, merge ratio or strength change never reloads
the base weights; ON_DETACH
(free_memory / unload_all_models) unloads it from the workers (group.unload) and closes every
worker group left with no model; the next use loads it again. Weight hooks (CreateHookLora ...)
cannot be applied on the workers: registering one raises. Every patch the workers cannot apply
(weight patch, transformer_options entry, object patch on the transformer, compute dtype) raises
before the first step, naming the node that added it (installer()).

One worker group per set of GPUs: loading on a config whose GPUs overlap a running group of another
config (a changed Config node, another weight_dtype) closes that group first. A MODEL built on the
closed group stays valid: its next use loads it again, as after ComfyUI unloaded it (and closes the
group then on those GPUs). A load that fails closes its group unless other models live on it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import weakref
from typing import Optional

import torch

import comfy.ldm.common_dit
import comfy.model_base
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
from comfy.patcher_extension import CallbacksMP

from .parallel import WorkerError, WorkerGroup, XDitUSPConfig
from .parallel.launcher import close_idle_groups, find_group, load_model
from .parallel.memory import freed_bytes, shared_footprint, shared_rank
from .parallel.protocol import ForwardInputs, Loaded
from .wan_to_xdit_mapping import (
    CheckpointInfo,
    read_header,
    diffusers_to_original_key,
    original_to_diffusers_key,
)

log = logging.getLogger("xdit_usp")

# What this process holds for a model: nothing but a few small Python objects. ComfyUI needs a
# positive size; the per-call tensors are accounted for in memory_required().
PROXY_SIZE = 1 << 20
PREFIX = "diffusion_model."


# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RemoteStats:
    """What a RemoteWanModel did, for logs and tests."""
    loads: int = 0  # checkpoint loads on the workers
    patch_sends: int = 0  # weight patch states sent (LoRAs, merges ...; an unchanged state is not sent)
    forwards: int = 0  # forwards run
    last_batch: int = 0  # batch of the last forward (cond+uncond batched -> 2)
    compiled_forwards: int = 0  # forwards whose blocks ran compiled (config compile or TorchCompileModel)


# The model as the worker group holds it, shared by every patcher (clones, two loader nodes) that
# uses the same file with the same config.
class RemoteWanModel:
    def __init__(self, config: XDitUSPConfig, path: str):
        self.config = config
        self.path = path
        self.key = path
        self.info: Optional[Loaded] = None
        # Weight patch state on the workers: ((ComfyUI key, ((strength, patch, strength_model, offset,
        # function), ...)), ...), patch objects compared by identity; () = the file's weights; None =
        # unknown (a send failed).
        self.patch_state: Optional[tuple] = ()
        self.patches: dict = {}  # the patches dict last applied (re-applied after a reload) ...
        self.patch_sources: dict = {}  # ... and who added them (XDitUSPModelPatcher.patch_sources)
        self.shapes: dict = {}  # ComfyUI key (diffusion_model.*) -> shape, for the patches' checks
        self.patchable: set = set()  # the keys native ComfyUI patches (natively_patched_keys)
        self.stats = RemoteStats()
        self.users = 0  # live ComfyUI models built on this (their clones share them)

    @property
    def group(self) -> Optional[WorkerGroup]:
        """The registered worker group of this config; None once it was closed for another config
        on the same GPUs, or for being idle."""
        return find_group(self.config)

    @property
    def loaded(self) -> bool:
        g = self.group
        return g is not None and g.alive and self.key in g.models

    def ensure_loaded(self) -> Loaded:
        if not self.loaded:
            log.info("xDiT-USP: loading %s on %d worker(s)", os.path.basename(self.path), self.config.world_size)
            self.info = info = load_model(self.config, self.key, self.path, on_evict=self._log_eviction)
            log.info("xDiT-USP: loaded %s in %.1f s: layout %s (batch 1: %s), %s attention, weights %s%s",
                     os.path.basename(self.path), info.load_s, info.layout, info.fallback_layout, info.backend,
                     info.placement, ", compiled (the first step at each size compiles)" if info.compiled else "")
            self.stats.loads += 1
            self.patch_state = ()  # fresh base weights
        return self.info

    def _log_eviction(self, old: WorkerGroup):
        models = ", ".join(sorted(os.path.basename(k) for k in old.models)) or "none"
        log.warning("xDiT-USP: closing the worker group of %s (models loaded: %s) to start one of %s on the same "
                    "devices; a MODEL built on the closed group loads again when used", _describe(old.config),
                    models, _describe(self.config))

    def ensure_ready(self):
        """Loaded, with the weight patches last asked for (after a relaunch or an unload elsewhere)."""
        self.ensure_loaded()
        self.apply_patches(self.patches, self.patch_sources)

    # ---- what a rank holds on ComfyUI's GPU (see XDitUSPModelPatcher.model_size) ------------------
    def shared_rank(self, device) -> Optional[int]:
        """The rank that runs on `device` (ComfyUI's load device, a torch.device), or None: CPU
        workers, a CPU device, or a GPU none of the ranks uses."""
        if self.config.device != "cuda" or getattr(device, "type", None) != "cuda":
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
        return shared_rank(self.config.visible_device_ids(), index)

    def footprint(self, device) -> Optional[tuple[int, int]]:
        """(size, held) on `device`: this model's bytes at its peak and now on the rank that shares
        it (parallel/memory.py shared_footprint), or None when no rank does. From the figures the
        group keeps from its last load, forward or trim; asks the workers only when it has none."""
        rank = self.shared_rank(device)
        if rank is None or self.info is None:
            return None
        info = self.info
        params = info.param_bytes_per_rank[rank] if rank < len(info.param_bytes_per_rank) else info.param_bytes
        if not self.loaded:
            return shared_footprint(False, params, info.peak_estimate)
        g = self.group
        stats = g.memory_stats
        if stats is None:
            try:
                stats = g.memory()
            except WorkerError as e:
                log.warning("xDiT-USP: could not read the workers' memory: %s", e)
        mine = stats[rank] if stats else None
        peaks = g.forward_peaks.get(self.key)
        return shared_footprint(True, params, info.peak_estimate,
                                reserved=mine.reserved if mine else None, params_all=mine.param_bytes if mine else None,
                                forward_peak=peaks[rank] if peaks else None)

    def trim(self, device) -> int:
        """Ask every rank to give back its allocator's unused cache; returns the bytes freed on
        `device` (by the rank sharing it; 0 if none does). Never raises: 0 when the group is gone."""
        g = self.group
        if g is None or not g.alive:
            return 0
        rank = self.shared_rank(device)
        try:
            before = g.memory_stats or g.memory()
            after = g.memory(trim=True)
        except WorkerError as e:  # a dead rank: the launcher closed the group; nothing is held
            log.warning("xDiT-USP: trimming the workers' memory failed: %s", e)
            return 0
        if rank is None:
            return 0
        freed = freed_bytes(before[rank].reserved, after[rank].reserved)
        log.info("xDiT-USP: rank %d gave back %.2f GB of cached memory on %s", rank, freed / 2**30, device)
        return freed

    def unload(self):
        g = self.group
        if g is not None and self.key in g.models:
            log.info("xDiT-USP: unloading %s from the workers", os.path.basename(self.path))
            try:
                g.unload(self.key)
            except WorkerError as e:  # a broken group is closed by the launcher; nothing left to free
                log.warning("xDiT-USP: unload of %s failed: %s", self.key, e)
        self.patch_state = ()

    def apply_patches(self, patches: dict, sources: dict):
        """Make the workers' weights those of a ModelPatcher's `patches` (LoRAs, merges,
        strength_model, set; skipped when unchanged). `sources`: who added them, for errors."""
        state = _patch_state(patches)
        if _same_state(state, self.patch_state):
            self.patches, self.patch_sources = patches, sources
            return False
        worker_patches = _worker_patches(patches, sources, self.shapes.__getitem__, self.patchable)  # refusals raise here
        try:
            self.group.set_weight_patches(self.key, worker_patches)
        except BaseException:
            self.patch_state = None  # unknown (a rank may have failed half-way): the next call sends again
            raise
        self.patch_state = state
        self.patches, self.patch_sources = patches, sources
        self.stats.patch_sends += 1
        return True


def _describe(config: XDitUSPConfig) -> str:
    where = f"{config.world_size} CPU rank(s)" if config.device == "cpu" else f"GPU(s) {config.visible_device_ids()}"
    return f"{where}, {config.dtype}"


_remotes: dict[tuple, RemoteWanModel] = {}
_remotes_lock = threading.Lock()
_orphans: set = set()  # remotes whose ComfyUI models were all garbage collected


def _release(remote: RemoteWanModel):
    # weakref.finalize callback: may run inside any allocation, so it only marks; the unload (which
    # talks to the workers) happens at the next safe point, reap_orphans().
    remote.users -= 1
    if remote.users <= 0:
        _orphans.add(remote)


def reap_orphans():
    """Unload from the workers the models no ComfyUI object refers to any more."""
    for r in list(_orphans):
        _orphans.discard(r)
        if r.users <= 0:
            r.unload()


def get_remote(config: XDitUSPConfig, path: str) -> RemoteWanModel:
    key = (config.to_json(), os.path.abspath(path))
    with _remotes_lock:
        r = _remotes.get(key)
        if r is None:
            r = _remotes[key] = RemoteWanModel(config, os.path.abspath(path))
        return r


def remote_models() -> list[RemoteWanModel]:
    """Every model built by a loader node in this process, loaded on its workers or not."""
    with _remotes_lock:
        return list(_remotes.values())


# ---------------------------------------------------------------------------------------------
# Which node installed a patch: every refusal names it.
_node_classes: dict = {}  # node class -> its type name (NODE_CLASS_MAPPINGS' key), for installed_by
_installed: dict[int, tuple] = {}  # id(patch function) -> (weakref to it, node); see note_installer


def _refresh_node_classes():
    import nodes

    if len(_node_classes) != len(nodes.NODE_CLASS_MAPPINGS):
        _node_classes.clear()
        _node_classes.update({c: n for n, c in nodes.NODE_CLASS_MAPPINGS.items() if isinstance(c, type)})


def installer() -> Optional[str]:
    """The node running now, as "ModelMergeSimple (node 12)": ComfyUI's executing context gives
    its id, the prompt being executed its type. None outside a node. (Not by walking the stack for
    a node's `self`: reading a frame's f_locals before Python 3.13 caches them on the frame, which
    keeps the caller's objects alive.)"""
    try:
        from comfy_execution.progress import get_progress_state
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    ctx = get_executing_context()
    if ctx is None:
        return None
    try:
        registry = get_progress_state()
        if registry.prompt_id == ctx.prompt_id:
            return f"{registry.dynprompt.get_node(ctx.node_id)['class_type']} (node {ctx.node_id})"
    except Exception:  # noqa: BLE001 - the type is a courtesy; the id is enough to find the node
        pass
    return f"node {ctx.node_id}"


def note_installer(obj, node: Optional[str]):
    """Remember that `node` installed the transformer_options entry `obj` (a patch function),
    for as long as `obj` lives (objects that take no weak reference are not remembered)."""
    if node is None:
        return
    key = id(obj)
    try:
        ref = weakref.ref(obj, lambda _r, key=key: _installed.pop(key, None))
    except TypeError:
        return
    _installed[key] = (ref, node)


def installed_by(obj) -> str:
    """The node that installed `obj`: as note_installer recorded it, else the node class whose code
    defines it (PerturbedAttentionGuidance adds its attention replacement from inside its CFG
    function, at sampling time, where no node runs: `PerturbedAttentionGuidance.execute.<locals>.…`)."""
    entry = _installed.get(id(obj))
    if entry is not None and entry[0]() is obj:
        return entry[1]
    qualname = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    owner = qualname.split(".")[0]
    _refresh_node_classes()
    for c, name in _node_classes.items():
        if c.__name__ == owner and getattr(obj, "__module__", None) == c.__module__:
            return f"{name} (its code)"
    return "a model-patching node"


# ---------------------------------------------------------------------------------------------
# Weight patches: ComfyUI's patch entries -> the workers' WeightPatches
def _is_noop(entry) -> bool:
    """A patch entry that leaves the weight as it is (strength 0 on an unscaled weight), as
    ModelMergeSimple at ratio 1 adds for every key; a "set" patch ignores its strength."""
    v = entry[1]
    is_set = isinstance(v, tuple) and len(v) == 2 and v[0] == "set"
    return float(entry[0]) == 0.0 and float(entry[2]) == 1.0 and not is_set


def _patch_state(patches: dict) -> tuple:
    out = []
    for key in sorted(patches):
        items = tuple((float(p[0]), p[1], float(p[2]), p[3], p[4]) for p in patches[key] if not _is_noop(p))
        if items:
            out.append((key, items))
    return tuple(out)


def _same_state(a: Optional[tuple], b: Optional[tuple]) -> bool:
    if a is None or b is None or len(a) != len(b):
        return False
    for (ka, ia), (kb, ib) in zip(a, b):
        if ka != kb or len(ia) != len(ib):
            return False
        for x, y in zip(ia, ib):
            if x[0] != y[0] or x[1] is not y[1] or x[2] != y[2] or x[3] != y[3] or x[4] is not y[4]:
                return False
    return True


def _tag_source(param: torch.Tensor, path: str, name: str):
    """Mark a meta parameter of our proxy with where the workers find its values: (checkpoint path,
    diffusers name). A merge whose second model is ours gets these very parameters from
    get_key_patches, and the workers read the file instead."""
    param._xdit_usp_source = (path, name)


def _worker_patches(patches: dict, sources: dict, shapes, patchable: set, check_only: bool = False) -> dict:
    """A ModelPatcher's `patches` ({`diffusion_model.<original key>`: [(strength_patch, value,
    strength_model, offset, function)]}) -> {diffusers name: [protocol.WeightPatch]}, entry by entry
    in ComfyUI's order. `sources`: {id(value): (value, node)} (XDitUSPModelPatcher.patch_sources);
    `shapes(key)`: the weight's shape. What the workers cannot apply exactly raises ValueError naming
    the node that added it and the key; nothing is sent then. `patchable`: the keys ComfyUI's own
    load patches (natively_patched_keys); a patch on any other key is skipped, as native ComfyUI
    skips it. `check_only`: the same checks, without computing a native second model's merged weights."""
    out, skipped = {}, []
    for key, plist in patches.items():
        if key not in patchable:
            skipped.append(key)
            continue
        where = lambda v, key=key: f"xDiT-USP: the patch {_source(sources, v)} put on {key}"  # noqa: E731
        if not key.startswith(PREFIX):
            raise ValueError(f"{where(plist[0][1])}: only {PREFIX}* weights live in the workers")
        name = original_to_diffusers_key(key[len(PREFIX):])
        if name is None:
            raise ValueError(f"{where(plist[0][1])}: the workers have no such weight")
        items = [_worker_patch(entry, key, shapes(key), sources, where, check_only) for entry in plist
                 if not _is_noop(entry)]
        items = [i for i in items if i is not None]
        if items:
            out[name] = items
    if skipped and not check_only:
        log.info("xDiT-USP: %d patched key(s) not applied, as native ComfyUI does not apply them (parameters of "
                 "a module that has sub-modules, e.g. %s)", len(skipped), sorted(skipped)[0])
    return out


def natively_patched_keys(patcher: comfy.model_patcher.ModelPatcher) -> set[str]:
    """The keys whose patches ComfyUI's own ModelPatcher.load applies: the parameters of the modules
    its _load_list walks. It leaves out the parameters a module holds next to sub-modules with
    parameters of their own (Wan's `blocks.N.modulation` and `head.modulation`): a merge or patch on
    those changes nothing natively, so it changes nothing on the workers either."""
    loading = comfy.model_patcher.ModelPatcher._load_list(patcher)  # ComfyUI's walk, on our meta tree
    return {comfy.model_patcher.key_param_name_to_key(x[-3], param) for x in loading for param in x[-1]}


def _source(sources: dict, v) -> str:
    entry = sources.get(id(v))
    return f"added by {entry[1]}" if entry is not None and entry[0] is v and entry[1] else "(added by an unknown node)"


# adapters whose patch is added to the weight and does not depend on it: name -> index of their
# dora_scale in .weights (comfy/weight_adapter/loha.py, lokr.py). GLoRA, OFT and BOFT use the weight.
_ADDITIVE_ADAPTERS = {"LoHaAdapter": 7, "LoKrAdapter": 8}


def _worker_patch(entry, key: str, shape: tuple, sources: dict, where, check_only: bool = False):
    """One ComfyUI patch entry -> a WeightPatch, or None where native ComfyUI skips it (a diff or
    merged weight of another shape: native logs "SHAPE MISMATCH ... NOT MERGED" and so do we)."""
    from comfy.weight_adapter import LoRAAdapter, WeightAdapterBase

    from .parallel.protocol import WeightPatch

    strength, v, strength_model, offset, function = entry
    strength, strength_model = float(strength), float(strength_model)
    if offset is not None or function is not None:
        raise ValueError(f"{where(v)}: patches on part of a weight (offset) or through a function are not "
                         "supported on the workers")
    if isinstance(v, WeightAdapterBase) and type(v).__name__ in _ADDITIVE_ADAPTERS:
        # LoHa, LoKr: W += strength * alpha * (a product of small factors), independent of W (without
        # DoRA). The product is formed here by ComfyUI's own code, on zeros, and sent whole as a diff.
        if v.weights[_ADDITIVE_ADAPTERS[type(v).__name__]] is not None:
            raise ValueError(f"{where(v)}: DoRA (dora_scale) is not supported on the workers")
        if check_only:
            return None
        delta = v.calculate_weight(torch.zeros(shape, dtype=torch.float32), key, 1.0, 1.0, None, lambda a: a,
                                   torch.float32, None)
        return WeightPatch("diff", [delta], strength, strength_model)
    if isinstance(v, WeightAdapterBase):
        if not isinstance(v, LoRAAdapter):
            raise ValueError(f"{where(v)}: {type(v).__name__} is not supported on the workers (LoRA, LoHa, LoKr, diff, "
                             "set and model merges are)")
        up, down, alpha, mid, dora_scale, reshape = v.weights
        if mid is not None:
            raise ValueError(f"{where(v)}: LoCon 'lora_mid' weights are not supported on the workers")
        if dora_scale is not None:
            raise ValueError(f"{where(v)}: DoRA (dora_scale) is not supported on the workers")
        if reshape is not None:
            raise ValueError(f"{where(v)}: 'reshape_weight' LoRAs are not supported on the workers")
        scale = strength * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
        return WeightPatch("lora", [up, down], scale, strength_model)
    if isinstance(v, list):  # a merge: v = [(the other model's weight, its convert function), *its patches]
        weight, convert = v[0]
        if tuple(weight.shape) != shape:
            log.warning("xDiT-USP: %s: merged weight of shape %s, the model's is %s: not merged (as native ComfyUI)",
                        key, tuple(weight.shape), shape)
            return None
        source = getattr(weight, "_xdit_usp_source", None)
        if source is not None:  # our model: the workers read its file; its own patches travel along
            nested = [_worker_patch(e, key, shape, sources, where, check_only) for e in v[1:] if not _is_noop(e)]
            return WeightPatch("weight", [], strength, strength_model, path=source[0], name=source[1],
                               patches=[p for p in nested if p is not None])
        if weight.device.type == "meta":
            raise ValueError(f"{where(v)}: the merged model's weights are not in this process")
        if check_only:
            return None
        import comfy.lora  # a native model: its patched weight, computed here exactly as ComfyUI does, goes whole

        merged = comfy.lora.calculate_weight(v[1:], convert(comfy.model_management.cast_to_device(
            weight, torch.device("cpu"), torch.float32, copy=True), inplace=True), key)
        return WeightPatch("diff", [merged], strength, strength_model)
    if len(v) == 1:
        kind, data = "diff", v
    elif len(v) == 2:
        kind, data = v
    else:
        raise ValueError(f"{where(v)}: unrecognised patch {type(v).__name__} of length {len(v)}")
    if kind not in ("diff", "set"):
        raise ValueError(f"{where(v)}: patch type {kind!r} is not supported on the workers (LoRA, LoHa, LoKr, diff, "
                         "set and model merges are)")
    if kind == "diff" and len(data) > 1 and isinstance(data[1], dict) and data[1].get("pad_weight"):
        raise ValueError(f"{where(v)}: padded diff patches (a weight made larger) are not supported on the workers")
    if tuple(data[0].shape) != shape:
        if kind == "diff":
            log.warning("xDiT-USP: %s: diff of shape %s, the weight's is %s: not merged (as native ComfyUI)",
                        key, tuple(data[0].shape), shape)
            return None
        raise ValueError(f"{where(v)}: 'set' value of shape {tuple(data[0].shape)} for a weight of shape {shape}")
    return WeightPatch(kind, [data[0]], strength, strength_model)


# ---------------------------------------------------------------------------------------------
class XDitUSPWanProxy(torch.nn.Module):
    """Stands where comfy.ldm.wan.model.WanModel would: same parameter names (meta tensors, no
    memory), same forward signature; the forward runs on the worker group."""

    def __init__(self, native: torch.nn.Module, remote: RemoteWanModel, dtype: torch.dtype):
        super().__init__()
        self._modules.update(native._modules)  # the meta tree, for state_dict() / LoRA key maps
        self._parameters.update(native._parameters)
        self._buffers.update(native._buffers)
        for name in ("patch_size", "dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "model_type"):
            if hasattr(native, name):
                setattr(self, name, getattr(native, name))
        self.native_class = type(native).__name__
        self.is_vace = hasattr(native, "vace_blocks")
        self.has_image_branch = getattr(native, "img_emb", None) is not None
        self.dtype = dtype
        self.remote = remote
        for name, param in native.named_parameters():  # a merge with this model reads its file on the workers
            target = original_to_diffusers_key(name)
            if target is not None:
                _tag_source(param, remote.path, target)

    def _apply(self, fn, recurse=True):
        return self  # .to()/.cuda()/.half(): the weights live in the workers; nothing here to move

    def extra_repr(self) -> str:
        return f"{self.native_class} on xDiT-USP workers ({self.remote.config.world_size} ranks, {os.path.basename(self.remote.path)})"

    # ComfyUI's TorchCompileModel wraps this module in torch.compile; there is nothing here to
    # compile (the forward is a call to the workers), so dynamo leaves it alone and the request is
    # passed on: the workers compile the blocks (ForwardInputs.compile, see _forward).
    @torch.compiler.disable
    def forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._forward,
            self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, transformer_options),
        ).execute(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)

    # conds that native Wan accepts and does not use for a plain forward
    _IGNORED_BY_NATIVE = ("denoise_mask", "crossattn_controlnet")

    def _forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):
        kwargs = dict(kwargs)
        control = kwargs.pop("control", None)
        vace_context = kwargs.pop("vace_context", None)
        vace_strength = kwargs.pop("vace_strength", None)
        for k in self._IGNORED_BY_NATIVE:
            kwargs.pop(k, None)
        problems = []
        if control is not None:
            problems.append("ControlNet (control) is not supported")
        if time_dim_concat is not None:
            problems.append("time_dim_concat (e.g. WanPhantomSubjectToVideo) is not supported")
        for k, v in kwargs.items():
            if v is not None:
                problems.append(f"the {k!r} conditioning is not supported")
        topts = transformer_options or {}
        skip_blocks, refused = check_transformer_options(topts, len(self.blocks))
        problems += refused
        audio, masks, _ = audio_patch(topts)
        audio_tokens = None
        if masks is not None:
            tokens = (-(-x.shape[3] // self.patch_size[1])) * (-(-x.shape[4] // self.patch_size[2]))
            if masks.shape[1] != tokens:
                problems.append(f"speaker masks of {masks.shape[1]} tokens from {installed_by(audio)}, a latent frame of "
                                f"{tokens} (native fails too: use a width and height that divide by 16)")
            masks = masks.float()
        if audio is not None:
            problems += _audio_layout_problems(self, self.remote.config, installed_by(audio))
            emb = topts.get("audio_embeds")
            frames = -(-x.shape[2] // self.patch_size[0])
            if emb is None or emb.ndim != 4 or emb.shape[0] != 1 or emb.shape[1] != frames:
                problems.append(f"the audio patch of {installed_by(audio)} needs transformer_options['audio_embeds'] "
                                f"[1, {frames} latent frames, tokens, dim], got "
                                f"{None if emb is None else tuple(emb.shape)}")
            else:
                audio_tokens = emb[0]
        if x.dtype != self.dtype:  # BaseModel casts the input to its compute dtype (checked at load too)
            problems.append(f"compute dtype {str(x.dtype)[6:]} (e.g. from ModelComputeDtype) differs from the "
                            f"workers' {str(self.dtype)[6:]}: set the dtype on the XDit+USP Config node instead")
        if problems:
            raise ValueError("xDiT-USP WanVideo model: " + "; ".join(problems) +
                             ". The worker group runs the plain Wan transformer; use a native loader for this graph.")

        ctrl, scale = None, None
        if self.is_vace:
            if vace_context is None:
                raise ValueError("xDiT-USP: this is a VACE model but no vace_context was given")
            if vace_context.ndim != 6 or vace_context.shape[1] != 1:
                raise ValueError(
                    f"xDiT-USP: VACE with {vace_context.shape[1] if vace_context.ndim == 6 else '?'} control inputs is not "
                    "supported (one WanVaceToVideo control per model)")
            ctrl = vace_context[:, 0]
            s = vace_strength[0] if isinstance(vace_strength, (list, tuple)) and vace_strength else vace_strength
            scale = [float(s)] if s is not None else None
        elif vace_context is not None:
            raise ValueError("xDiT-USP: vace_context given to a model that is not a VACE model")

        bs, c, t, h, w = x.shape
        x = comfy.ldm.common_dit.pad_to_patch_size(x, self.patch_size)
        if ctrl is not None:
            ctrl = comfy.ldm.common_dit.pad_to_patch_size(ctrl, self.patch_size)
        img = clip_fea if (clip_fea is not None and self.has_image_branch) else None  # native ignores it otherwise

        comfy.model_management.throw_exception_if_processing_interrupted()
        remote = self.remote
        if not remote.loaded:  # the group died or the model was unloaded since load_models_gpu
            remote.ensure_ready()
        stats = {}
        uni3c_input = uni3c = None
        for patch in uni3c_patches(topts):  # WanUni3CControlnetApply: at most one (check_transformer_options)
            problems = uni3c_layout_problems(remote.config, self.num_heads, patch)
            if problems:
                _refuse(problems)
            request = _uni3c_request(remote.group, patch, x, self.dtype, topts)
            if request is not None:
                uni3c_input, uni3c = request
        try:
            audio_key = _send_audio_patch(remote.group, audio, len(self.blocks)) if audio is not None else None
            out = remote.group.forward(remote.key, ForwardInputs(
                hidden_states=x,
                timestep=timestep,
                encoder_hidden_states=context,
                encoder_hidden_states_image=img,
                control_hidden_states=ctrl,
                control_hidden_states_scale=scale,
                skip_blocks=skip_blocks or None,
                rope_options=topts.get("rope_options"),  # ScaleROPE: positions scaled/shifted per axis
                compile=_torch_compile_requested(topts),
                uni3c_input=uni3c_input,
                uni3c=uni3c,
                audio_tokens=audio_tokens,
                audio_key=audio_key,
                audio_scale=float(audio.audio_scale) if audio is not None else 1.0,
                audio_ref_masks=masks,
            ), stats=stats)
        except WorkerError as e:
            raise WorkerError(f"xDiT-USP worker rank {e.rank} failed: {e}", rank=e.rank) from e
        remote.stats.forwards += 1
        remote.stats.compiled_forwards += bool(stats.get("compiled"))
        remote.stats.last_batch = bs
        return out.to(x.device)[:, :, :t, :h, :w]


# ---------------------------------------------------------------------------------------------
def _is_skip(replace) -> bool:
    """Whether a block replacement skips its block: called as native Wan calls it, it returns the
    stream it was given without running the original block. That is what SkipLayerGuidanceDiT and
    SkipLayerGuidanceDiTSimple install (`def skip(args, extra_args): return args`), found by what the
    function does, not by its name. A function that raises on the probe is not a skip."""
    stream, ran = torch.empty(0), []

    def original_block(args):
        ran.append(True)
        return {"img": args["img"]}

    try:
        out = replace({"img": stream, "txt": None, "vec": None, "pe": None, "transformer_options": {}},
                      {"original_block": original_block})
    except Exception:  # noqa: BLE001 - anything else is refused as an unsupported replacement
        return False
    return not ran and isinstance(out, dict) and out.get("img") is stream


def _torch_compile_requested(transformer_options: dict) -> bool:
    """Whether ComfyUI's TorchCompileModel (comfy_api.torch_helpers.set_torch_compile_wrapper) is on
    this MODEL: its apply_model wrapper, under the key "torch.compile". Whatever its backend, the
    workers then compile their blocks' per-token work with inductor (see parallel/sp_wan.Stages)."""
    wrappers = (transformer_options.get("wrappers") or {}).get(comfy.patcher_extension.WrappersMP.APPLY_MODEL) or {}
    return bool(wrappers.get("torch.compile"))


def _block_skips(patches_replace: dict, num_blocks: int) -> tuple[list[int], list]:
    """(blocks to skip, [(key, replacement)] of the block replacements that are not skips) of
    transformer_options' patches_replace, read as native Wan reads it: only ("double_block", i)
    under "dit", i < the block count (native ignores every other key there, "single_block" included)."""
    skip, other = [], []
    for key, replace in (patches_replace.get("dit") or {}).items():
        if isinstance(key, tuple) and len(key) == 2 and key[0] == "double_block" and isinstance(key[1], int) \
                and 0 <= key[1] < num_blocks:
            if _is_skip(replace):
                skip.append(key[1])
            else:
                other.append((key, replace))
    return sorted(skip), other


# transformer_options entries native Wan (comfy/ldm/wan/model.py and the attention it calls) reads,
# besides "patches" and "patches_replace": honoured on the workers, or refused with the reason.
# Everything else in transformer_options native Wan never reads (the sampler's cond_or_uncond,
# sigmas, uuids ..., other models' keys), so it changes nothing there either.
NATIVE_WAN_OPTIONS = {
    "rope_options": None,  # honoured: ScaleROPE's positions travel with the forward
    "optimized_attention_override": "an attention function replacing ComfyUI's (the workers run the Config node's "
                                    "attention backend)",
}


def _is_uni3c(patch) -> bool:
    """Whether a double_block patch is ComfyUI's WanUni3CCnetPatch (comfy_extras/nodes_model_patch.py),
    by its class and the attributes the workers' copy reads: its control net (model_patch.model with
    controlnet_blocks / proj_out), strength, sigma window and its own control-input builder."""
    if type(patch).__name__ != "WanUni3CCnetPatch":
        return False
    net = getattr(getattr(patch, "model_patch", None), "model", None)
    return (net is not None and hasattr(net, "controlnet_blocks") and hasattr(net, "proj_out")
            and all(hasattr(patch, a) for a in ("strength", "sigma_start", "sigma_end", "build_controlnet_input")))


def uni3c_patches(topts: dict) -> list:
    """The Uni3C patches among transformer_options' double_block patches."""
    return [p for p in ((topts.get("patches") or {}).get("double_block") or []) if _is_uni3c(p)]


def uni3c_layout_problems(config: XDitUSPConfig, num_heads: int, patch) -> list[str]:
    """What in the Config Uni3C cannot run with (before sampling; the launcher checks again per call)."""
    by = installed_by(patch)
    if config.pipeline_parallel_degree > 1 or config.tensor_parallel_degree > 1:
        return [f"Uni3C (installed by {by}) with pipeline_parallel_degree / tensor_parallel_degree > 1 is not supported: "
                "use the sequence layouts (Ulysses, ring, CFG split) with replicated or fsdp weights"]
    heads = patch.model_patch.model.controlnet_blocks[0].self_attn.num_heads
    try:
        layouts = (config.resolve(num_heads), config.fallback_layout(num_heads))
    except Exception:  # noqa: BLE001 - the loader reports layout errors itself
        return []
    bad = sorted({lay.ulysses for lay in layouts if heads % lay.ulysses})
    if bad:
        return [f"Uni3C (installed by {by}): its control network has {heads} heads, which Ulysses degree {bad[0]} does "
                f"not divide; set ulysses_degree on the Config to one of "
                f"{[d for d in range(1, heads + 1) if heads % d == 0]} (ring_degree takes the rest)"]
    return []


_uni3c_keys: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # control net module -> content key


def _uni3c_request(group, patch, x: torch.Tensor, dtype: torch.dtype, topts: dict) -> Optional[tuple]:
    """(control input, {"key", "strength"}) for this call, or None outside the patch's sigma window:
    what WanUni3CCnetPatch computes at block 0, by its own code (build_controlnet_input: the first 20
    channels of `x`, zero-padded, and the render video encoded with ComfyUI's VAE, cached on the
    patch as native caches it), for one cond's rows. The net's weights go to the workers once per
    content (launcher.uni3c_load)."""
    sigmas = topts.get("sigmas")
    if sigmas is not None:
        sigma = sigmas[0].item()
        if sigma > patch.sigma_start or sigma < patch.sigma_end:
            return None
    num_conds = len(topts.get("cond_or_uncond", [0]))
    rows = x.shape[0]
    if num_conds > 0 and x.shape[0] % num_conds == 0:
        rows = x.shape[0] // num_conds
    control = patch.build_controlnet_input(x, dtype, rows)
    net = patch.model_patch.model
    key = _uni3c_keys.get(net)
    sd = net.state_dict()
    if key is None:
        from .parallel.launcher import uni3c_key
        from .parallel.uni3c import UNUSED_PREFIXES

        key = _uni3c_keys[net] = uni3c_key({k: v for k, v in sd.items() if not k.startswith(UNUSED_PREFIXES)})
    group.uni3c_load(sd, key=key)
    return control.cpu(), {"key": key, "strength": float(patch.strength)}


def check_transformer_options(topts: dict, num_blocks: int) -> tuple[list[int], list[str]]:
    """(blocks to skip, problems): the problems are what in `topts` (a forward's
    transformer_options) native Wan would apply and the workers cannot, each naming the node that
    installed it. Honoured: block replacements that skip their block (Skip Layer Guidance),
    rope_options (ScaleROPE), DIFFUSION_MODEL wrappers (they run in this process around the
    workers' forward). Every other "patches" / "patches_replace" entry is
    refused by kind, whether native Wan reads that kind or not (a kind it ignores today may be read
    tomorrow; a node that installs one expects an effect): never dropped."""
    problems = []
    skip, replaced = _block_skips(topts.get("patches_replace") or {}, num_blocks)
    problems += [f"patches_replace 'dit' {key!r} installed by {installed_by(fn)} (a block replacement other than "
                 "a skip) is not supported" for key, fn in replaced]
    uni3c = uni3c_patches(topts)
    if len(uni3c) > 1:
        problems.append(f"{len(uni3c)} Uni3C patches (WanUni3CControlnetApply, installed by "
                        f"{', '.join(sorted({installed_by(p) for p in uni3c}))}): the workers run one per model")
    problems += audio_patch(topts)[2]
    for where in ("patches_replace", "patches"):
        for kind, entries in sorted((topts.get(where) or {}).items(), key=lambda kv: str(kv[0])):
            if not entries or (where == "patches_replace" and kind == "dit"):
                continue
            fns = entries.values() if isinstance(entries, dict) else entries
            if where == "patches" and kind == "double_block":
                fns = [fn for fn in fns if not _is_uni3c(fn)]  # honoured: Uni3C runs on the workers
            if where == "patches" and kind == "attn2_patch":  # InfiniteTalk's audio: honoured, or said above
                fns = [fn for fn in fns if not _is_multitalk(fn, "MultiTalkCrossAttnPatch")]
            if where == "patches" and kind == "attn1_patch":  # InfiniteTalk's two-speaker map: said above
                fns = [fn for fn in fns if not _is_multitalk(fn, "MultiTalkGetAttnMapPatch")]
            if not fns:
                continue
            by = sorted({installed_by(fn) for fn in fns})
            problems.append(f"{where} {kind!r} installed by {', '.join(by)} is not supported")
    for key, why in NATIVE_WAN_OPTIONS.items():
        if why is not None and topts.get(key) is not None:
            problems.append(f"{key} installed by {installed_by(topts[key])}: {why}")
    return skip, problems


def _is_multitalk(fn, name: str) -> bool:
    """Whether `fn` is ComfyUI's comfy.ldm.wan.model_multitalk.<name> (by its class, so that a
    ComfyUI that moved the module is still recognised, and a look-alike from elsewhere is not)."""
    cls = type(fn)
    return cls.__name__ == name and cls.__module__.endswith("model_multitalk")


def audio_patch(topts: dict) -> tuple[Optional[object], Optional[torch.Tensor], list[str]]:
    """(the InfiniteTalk / MultiTalk audio patch the workers run, its two speakers' masks or None,
    problems): ComfyUI's MultiTalkCrossAttnPatch in transformer_options' "attn2_patch"
    (WanInfiniteTalkToVideo) is honoured on the workers, and with two speakers its
    MultiTalkGetAttnMapPatch "attn1_patch" (the speaker map taken from self-attention, masks
    [2, first-frame tokens]); a second audio patch or map, or a map without its audio patch, are refused."""
    patches = topts.get("patches") or {}
    found = [fn for fn in patches.get("attn2_patch") or [] if _is_multitalk(fn, "MultiTalkCrossAttnPatch")]
    maps = [fn for fn in patches.get("attn1_patch") or [] if _is_multitalk(fn, "MultiTalkGetAttnMapPatch")
            and getattr(fn, "ref_target_masks", None) is not None]  # without masks native's map patch does nothing
    problems = []
    if len(found) > 1:
        problems.append(f"{len(found)} audio patches installed by {', '.join(sorted({installed_by(f) for f in found}))}: "
                        "the workers run one")
    if len(maps) > 1 or (maps and len(found) != 1):
        problems.append(f"{len(maps)} speaker maps (InfiniteTalk two_speakers) installed by "
                        f"{', '.join(sorted({installed_by(f) for f in maps}))} with {len(found)} audio patches: the "
                        "workers run one map with its one audio patch")
    masks = None
    if len(maps) == 1:
        masks = maps[0].ref_target_masks
        if masks.ndim != 2 or masks.shape[0] != 2:
            problems.append(f"speaker masks of shape {tuple(masks.shape)} from {installed_by(maps[0])}: the workers run "
                            "two speakers ([2, first-frame tokens])")
    if problems:
        return None, None, problems
    return (found[0] if found else None), masks, problems


def _audio_layout_problems(proxy, config: XDitUSPConfig, by: str) -> list[str]:
    problems = []
    if proxy.is_vace:
        problems.append(f"the audio patch of {by} on a VACE model is not supported")
    if config.tensor_parallel_degree > 1 or config.pipeline_parallel_degree > 1:
        problems.append(f"the audio patch of {by} runs with the sequence layouts (Ulysses, ring, CFG split) and fsdp, "
                        "not with tensor_parallel_degree or pipeline_parallel_degree > 1: set them to 1 on the "
                        "XDit+USP Config node")
    return problems


# content keys of audio patch weights, by the patch module (a pass over its weights, once per module and dtype)
_audio_keys: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _send_audio_patch(group: WorkerGroup, patch, num_blocks: int) -> str:
    """The audio patch's per-block weights onto the group (once per content; launcher.audio_load),
    returning their key. `patch.model_patch` is ModelPatchLoader's MODEL_PATCH of an InfiniteTalk /
    MultiTalk file (MultiTalkModelPatch: its audio_proj already ran in WanInfiniteTalkToVideo, so
    only the blocks travel)."""
    from .parallel.launcher import content_key

    mp = patch.model_patch
    module = getattr(mp, "model", mp)
    if getattr(mp, "patches", None):
        raise ValueError(f"xDiT-USP: the audio model patch of {installed_by(patch)} has weight patches of its own: "
                         "not supported")
    blocks = getattr(module, "blocks", None)
    if blocks is None or len(blocks) < num_blocks:
        raise ValueError(f"xDiT-USP: the audio model patch of {installed_by(patch)} has "
                         f"{0 if blocks is None else len(blocks)} blocks, the model {num_blocks}")
    tensors = {f"blocks.{i}.{k}": v for i in range(num_blocks) for k, v in blocks[i].state_dict().items()}
    attn = blocks[0].audio_cross_attn
    heads, eps = int(attn.num_heads), float(blocks[0].norm_x.eps)
    tag = f"{group.config.torch_dtype()}|{heads}|{eps}"
    memo = _audio_keys.setdefault(module, {})
    if (tag, num_blocks) not in memo:
        memo[tag, num_blocks] = content_key("audio", tensors, tag)
    return group.audio_load(tensors, heads, eps, key=memo[tag, num_blocks])


def _memory_required(self, input_shape, cond_shapes={}):
    """ComfyUI-side memory of one call: the latent in, a few copies of it (scaled input, output,
    denoised, shared-memory staging) and the conds. The transformer's memory is on the workers."""
    dtype_size = 4
    n = math.prod(input_shape)
    total = n * dtype_size * 6
    for shapes in (cond_shapes or {}).values():
        for s in shapes:
            total += math.prod(s) * dtype_size * 2
    return total


_subclasses: dict[type, type] = {}


def _remote_class(cls: type) -> type:
    sub = _subclasses.get(cls)
    if sub is None:
        sub = _subclasses[cls] = type("XDitUSP" + cls.__name__, (cls,), {
            "memory_required": _memory_required, "__module__": __name__,
            "__doc__": f"{cls.__name__} whose transformer runs on an xDiT-USP worker group.",
        })
    return sub


class XDitUSPModelPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher whose weights live in the worker group. ComfyUI's own load, partially_load,
    unpatch_model and detach run on it: with no weight in this process (_load_list is empty) they
    only keep ComfyUI's bookkeeping, and the callbacks build_model_patcher registers do the
    workers' part (clones inherit them).

    Memory, as ComfyUI's manager (comfy/model_management.py) sees it: when a rank runs on
    ComfyUI's load device (GPU 0 for both, typically), model_size() is what that rank will hold
    for this model at its peak and loaded_size() what it holds now (RemoteWanModel.footprint), so
    load_models_gpu makes room for the rank, and under pressure free_memory asks partially_unload
    for memory_to_free bytes, which trims the ranks' allocator caches, before it would detach (and
    so unload) the model. When no rank shares the device (CPU, other GPUs) nothing changes:
    PROXY_SIZE, and ComfyUI's own loaded_size."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Who added what, for the errors that refuse it: {id(patch value): (value, node)} of the
        # weight patches, {object patch name: node}. Clones copy both (clone()).
        self.patch_sources: dict = {}
        self.object_sources: dict = {}  # object patches, injections and weight wrappers by name

    def clone(self, *args, **kwargs):
        n = super().clone(*args, **kwargs)
        if isinstance(n, XDitUSPModelPatcher):
            n.patch_sources = dict(self.patch_sources)
            n.object_sources = dict(self.object_sources)
        return n

    # ---- the methods nodes patch a model through: remember the node, for the refusals -------------
    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        node = installer()
        for v in patches.values():
            self.patch_sources[id(v)] = (v, node)
        return super().add_patches(patches, strength_patch, strength_model)

    def set_model_patch(self, patch, name):
        note_installer(patch, installer())
        return super().set_model_patch(patch, name)

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        note_installer(patch, installer())
        return super().set_model_patch_replace(patch, name, block_name, number, transformer_index)

    def set_model_optimized_attention(self, optimized_attention):
        super().set_model_optimized_attention(optimized_attention)
        note_installer(self.model_options["transformer_options"].get("optimized_attention_override"), installer())

    def add_object_patch(self, name, obj):
        self.object_sources[name] = installer()
        return super().add_object_patch(name, obj)

    def set_injections(self, key, injections):
        self.object_sources["injections", key] = installer()
        return super().set_injections(key, injections)

    def add_weight_wrapper(self, name, function):
        self.object_sources["weight_wrapper", name] = installer()
        return super().add_weight_wrapper(name, function)

    @property
    def remote(self) -> RemoteWanModel:
        return self.model.diffusion_model.remote

    def model_patches_models(self):
        """The models ComfyUI loads with this one (load_models_gpu), less Uni3C's control net: the
        workers hold their own copy, so ComfyUI's device does not need one (native loads it there
        because it computes there)."""
        uni3c = {id(p.model_patch) for p in uni3c_patches(self.model_options.get("transformer_options") or {})}
        return [m for m in super().model_patches_models() if id(m) not in uni3c]

    def _load_list(self, for_dynamic=False, default_device=None):
        return []  # the proxy's parameters are meta tensors; the weights are on the workers

    def model_size(self):
        f = self.remote.footprint(self.load_device)
        return super().model_size() if f is None else max(f[0], PROXY_SIZE)

    def loaded_size(self):
        f = self.remote.footprint(self.load_device)
        return super().loaded_size() if f is None else f[1]

    def current_loaded_device(self):
        # Loaded on the workers is loaded: ComfyUI then charges a load only what the model still
        # lacks (model_size - loaded_size), not again what a rank on its device already holds.
        return self.load_device if self.remote.loaded else super().current_loaded_device()

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        # Always a full load: the workers hold all of the model or none of it, whatever budget
        # ComfyUI's lowvram mode computed from model_size(); with an empty _load_list this only
        # records the load (model_loaded_weight_memory = model_size()) and runs the callbacks.
        super().load(device_to, lowvram_model_memory, force_patch_weights, full_load=True)

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        """ComfyUI needs `memory_to_free` bytes on its device: trim the ranks' allocator caches and
        return what that freed there. When it is enough, ComfyUI keeps the model loaded
        (LoadedModel.model_unload); otherwise it detaches it, which unloads it from the workers
        (ON_DETACH). Never raises."""
        try:
            return self.remote.trim(self.load_device)
        except Exception as e:  # noqa: BLE001 - ComfyUI's memory manager must not fail on us
            log.warning("xDiT-USP: partially_unload failed: %s", e)
            return 0

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False, return_weight=False, force_cast=False):
        raise RuntimeError(f"xDiT-USP: weights live in the worker group; {key} cannot be patched in ComfyUI's process")


CALLBACK_KEY = "xdit_usp"


def _refuse_weight_hooks(patcher: XDitUSPModelPatcher, *args):
    """CallbacksMP.ON_REGISTER_ALL_HOOK_PATCHES / ON_LOAD: weight hooks would be applied to this
    process's meta weights, i.e. not at all; say so instead."""
    if patcher.hook_patches:
        raise ValueError("xDiT-USP: weight hooks (CreateHookLora, CreateHookModelAsLora ...) cannot be applied on the "
                         "worker group; apply the LoRA with LoraLoaderModelOnly instead")


def object_patch_problems(patcher: XDitUSPModelPatcher) -> list[str]:
    """What `patcher` changes in the model that the workers cannot honour, each naming the node that
    did it: a compute dtype other than the workers' (ModelComputeDtype sets the object patch
    `manual_cast_dtype`: native Wan would then compute in it), anything replaced inside the
    transformer (`diffusion_model.*` object patches), and module injections or weight wrappers
    (LoraLoaderBypass's forward hooks, training adapters): this process holds only the
    transformer's meta tree, so they would do nothing. Object patches on the rest of the model
    (model_sampling, latent_format ...) run in this process and are honoured."""
    problems = []
    src = patcher.object_sources
    for key, injections in patcher.injections.items():
        if injections:
            problems.append(f"module injections {key!r} set by {src.get(('injections', key)) or 'a model-patching node'} "
                            "(e.g. LoraLoaderBypass: apply the LoRA with LoraLoaderModelOnly, which is the same sum "
                            "merged into the weights)")
    for key in patcher.weight_wrapper_patches:
        problems.append(f"weight wrapper on {key} set by {src.get(('weight_wrapper', key)) or 'a model-patching node'}")
    workers = patcher.remote.config.torch_dtype()
    for name, obj in patcher.object_patches.items():
        by = patcher.object_sources.get(name) or "a model-patching node"
        if name == "manual_cast_dtype":
            if obj is not None and obj != workers:
                problems.append(f"compute dtype {str(obj)[6:]} set by {by} (ModelComputeDtype) differs from the workers' "
                                f"{str(workers)[6:]}: set the dtype on the XDit+USP Config node instead")
        elif name == "diffusion_model" or name.startswith("diffusion_model."):
            problems.append(f"object patch {name!r} set by {by}: the transformer runs on the workers")
    return problems


def patcher_problems(patcher: XDitUSPModelPatcher, model_options: dict) -> list[str]:
    """Everything `patcher` (with the sampler's `model_options`) asks of the model that the workers
    cannot honour, each naming the node that installed it: object patches, injections and weight
    wrappers (object_patch_problems), transformer_options patches (check_transformer_options)
    and weight patches (_worker_patches, checked without computing anything)."""
    problems = object_patch_problems(patcher)
    topts = model_options.get("transformer_options") or {}
    problems += check_transformer_options(topts, len(patcher.model.diffusion_model.blocks))[1]
    for patch in uni3c_patches(topts):
        problems += uni3c_layout_problems(patcher.remote.config, patcher.model.diffusion_model.num_heads, patch)
    audio, _, _ = audio_patch(topts)
    if audio is not None:
        problems += _audio_layout_problems(patcher.model.diffusion_model, patcher.remote.config, installed_by(audio))
    shapes = patcher.remote.shapes
    try:
        _worker_patches(patcher.patches, patcher.patch_sources, shapes.__getitem__, patcher.remote.patchable,
                        check_only=True)
    except ValueError as e:
        problems.append(str(e).removeprefix("xDiT-USP: "))
    return problems


def _refuse(problems: list[str]):
    if problems:
        raise ValueError("xDiT-USP WanVideo model: " + "; ".join(problems) +
                         ". The worker group runs the plain Wan transformer; use a native loader for this graph.")


def _preflight(executor, *args, **kwargs):
    """WrappersMP.OUTER_SAMPLE, before a sampler loads anything: refuse what the workers cannot
    honour, so that the error comes before the model is loaded (ComfyUI would unload a model whose
    load raised) and before any step."""
    guider = executor.class_obj
    if isinstance(guider.model_patcher, XDitUSPModelPatcher):
        _refuse(patcher_problems(guider.model_patcher, guider.model_options))
    return executor(*args, **kwargs)


def _on_load(patcher: XDitUSPModelPatcher, device_to, lowvram_model_memory, force_patch_weights, full_load):
    """CallbacksMP.ON_LOAD: the model on the workers, with this patcher's weight patches (those the
    workers cannot apply raise here too when the model is loaded outside a sampler)."""
    _refuse_weight_hooks(patcher)
    _refuse(object_patch_problems(patcher))
    reap_orphans()
    remote = patcher.remote
    remote.ensure_loaded()
    remote.apply_patches(patcher.patches, patcher.patch_sources)


def _on_cleanup(patcher: XDitUSPModelPatcher):
    """CallbacksMP.ON_CLEANUP, at the end of every sampling (CFGGuider.outer_sample): the ranks give
    back the activation memory their allocators keep cached (Memory(trim=True)), so that what runs
    next on their GPUs, ComfyUI's VAE decode on GPU 0 above all, finds it free. The next sampling
    allocates it again in its first step (a few ms); the weights stay loaded."""
    remote = patcher.remote
    if remote.loaded:
        remote.trim(patcher.load_device)


def _on_detach(patcher: XDitUSPModelPatcher, unpatch_all: bool):
    """CallbacksMP.ON_DETACH. detach(True) is ComfyUI freeing this model's memory
    (LoadedModel.model_unload, from free_memory / unload_all_models): unload it from the workers,
    then close every worker group left with no model (its processes and their CUDA contexts); the
    next use loads it again. detach(False) is a clone being garbage-collected
    (ModelPatcher.__del__), or replaced by a clone about to load: the other clones still use the
    workers' copy, and the last one going is handled by reap_orphans()."""
    if unpatch_all:
        patcher.remote.unload()
    reap_orphans()
    if unpatch_all:
        for g in close_idle_groups():
            log.info("xDiT-USP: closed the idle worker group of %s", _describe(g.config))


# ---------------------------------------------------------------------------------------------
def _original_meta_state_dict(path: str, ckpt: CheckpointInfo, dtype: torch.dtype) -> tuple[dict, Optional[dict]]:
    """Original-named meta tensors with the checkpoint's shapes (header only), and its metadata."""
    meta = read_header(path)
    sd = {}
    for raw, (shape, _dt) in meta.items():
        k = raw[len(ckpt.prefix):] if ckpt.prefix and raw.startswith(ckpt.prefix) else raw
        if ckpt.format == "diffusers":
            k = diffusers_to_original_key(k)
        elif original_to_diffusers_key(k) is None:
            k = None  # scale tensors, markers
        if k is not None:
            sd[k] = torch.empty(shape, dtype=dtype, device="meta")
    metadata = None
    if os.path.isfile(path):
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                metadata = f.metadata()
        except Exception:  # metadata is optional
            metadata = None
    return sd, metadata


def build_model_patcher(config: XDitUSPConfig, path: str, ckpt: CheckpointInfo) -> XDitUSPModelPatcher:
    """Native ComfyUI Wan model (detected from the header), transformer replaced by the proxy, on
    the worker group of `config`; the checkpoint is loaded on the workers now."""
    dtype = config.torch_dtype()
    sd, metadata = _original_meta_state_dict(path, ckpt, dtype)
    model_config = comfy.model_detection.model_config_from_unet(sd, "", metadata=metadata)
    if model_config is None:
        raise ValueError(f"ComfyUI does not recognise {os.path.basename(path)} as a model it knows (detected by us as Wan {ckpt.variant})")
    uc = model_config.unet_config
    if uc.get("image_model") != "wan2.1":
        raise ValueError(f"{os.path.basename(path)}: ComfyUI detects {uc.get('image_model')!r}, not a Wan transformer")
    uc["text_dim"] = ckpt.diffusers_config["text_dim"]  # ComfyUI assumes 4096 unless told
    model_config.set_inference_dtype(dtype, None)
    base = model_config.get_model(sd, "", device=torch.device("meta"))
    if not isinstance(base, comfy.model_base.WAN21):
        raise ValueError(f"{os.path.basename(path)}: ComfyUI builds {type(base).__name__}, not a Wan model")

    remote = get_remote(config, path)
    remote.users += 1  # before reaping: a re-run loader must not unload the model it is about to use
    reap_orphans()
    try:
        info = remote.ensure_loaded()
    except BaseException:
        _release(remote)  # no ComfyUI model was made from it
        raise
    native = base.diffusion_model
    in_dim = native.patch_embedding.weight.shape[1]
    if info.in_channels != in_dim or info.out_channels != native.out_dim:
        _release(remote)
        raise ValueError(
            f"{os.path.basename(path)}: workers built {info.variant} with {info.in_channels}->{info.out_channels} "
            f"channels but ComfyUI's {type(base).__name__} expects {in_dim}->{native.out_dim}")
    proxy = XDitUSPWanProxy(native, remote, dtype)
    base.diffusion_model = proxy
    remote.shapes = {k: tuple(t.shape) for k, t in base.state_dict().items()}
    base.__class__ = _remote_class(type(base))
    base.device = None
    weakref.finalize(base, _release, remote)  # from here on, base's lifetime owns the users count
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    patcher = XDitUSPModelPatcher(base, load_device=load_device, offload_device=offload_device, size=PROXY_SIZE)
    patcher.add_callback_with_key(CallbacksMP.ON_LOAD, CALLBACK_KEY, _on_load)
    patcher.add_callback_with_key(CallbacksMP.ON_DETACH, CALLBACK_KEY, _on_detach)
    patcher.add_callback_with_key(CallbacksMP.ON_CLEANUP, CALLBACK_KEY, _on_cleanup)
    patcher.add_callback_with_key(CallbacksMP.ON_REGISTER_ALL_HOOK_PATCHES, CALLBACK_KEY, _refuse_weight_hooks)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, CALLBACK_KEY, _preflight)
    remote.patchable = natively_patched_keys(patcher)
    return patcher

