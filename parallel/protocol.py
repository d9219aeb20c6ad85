"""The owner <-> worker contract: every request and reply, typed and declared once.

Messages cross the authenticated control channel as plain builtins, `(kind, {field: value})`, never
as pickled classes (the owner and the workers may import this package under different names, and
an unpickler should rebuild nothing but data). `encode` flattens a message dataclass, `decode`
rebuilds it from its field types, nested dataclasses (`Layout`, `TensorSpec`) included.

Tensors never travel in messages: the owner writes them into the shared-memory arena and a
`TensorSpec` (offset, shape, dtype) says where each one is.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Optional

from .config import Layout


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lies in the shared-memory arena."""

    offset: int
    shape: tuple
    dtype: str  # str(torch.dtype), e.g. "torch.bfloat16"


# The tensors of one transformer forward, in diffusers' names and order. ForwardInputs (below) is
# the one place they are declared: the proxy builds one, the owner packs it into the arena, the
# runner slices and moves it.
# ForwardInputs.rope_options' keys (ComfyUI's transformer_options["rope_options"]), with their identity values
ROPE_OPTIONS = {"scale_t": 1.0, "scale_y": 1.0, "scale_x": 1.0, "shift_t": 0.0, "shift_y": 0.0, "shift_x": 0.0}


@dataclass
class ForwardInputs:
    """One Wan transformer forward, diffusers' argument names.

    hidden_states                [B, C, frames, height, width] latent (padded to the patch size)
    timestep                     [B], [B, frames] or [B, tokens] (Wan 2.2 TI2V: per token)
    encoder_hidden_states        [B, text tokens, text dim]
    encoder_hidden_states_image  [B, image tokens, image dim] CLIP features (I2V, FLF2V) or None
    control_hidden_states        [B, C, frames, height, width] VACE control latent or None
    control_hidden_states_scale  VACE strength per control layer set, or None
    skip_blocks                  indices of transformer blocks this call skips (the residual stream
                                 passes them unchanged: Skip Layer Guidance), or None
    rope_options                 RoPE positions scaled and shifted per axis, ComfyUI's keys
                                 (scale_t/_y/_x, shift_t/_y/_x: position k -> shift + k * scale; ScaleROPE),
                                 or None
    compile                      run the blocks' per-token work compiled in this forward even when the
                                 group's config does not (ComfyUI's TorchCompileModel on the MODEL)
    uni3c_input                  [n, C, frames, height, width] Uni3C control input (model input's first
                                 20 channels + the render latent, built by ComfyUI's patch) of the first
                                 n rows (one cond's: row r of the batch uses control row r % n), or None
    uni3c                        with uni3c_input: {"key": the control net loaded by uni3c_load,
                                 "strength": float} (the sigma window is applied by the owner: outside
                                 it, no uni3c is sent)
    audio_tokens                 [latent frames, audio tokens, audio dim] projected audio context of an
                                 audio patch (InfiniteTalk / MultiTalk: ComfyUI's already projected
                                 transformer_options["audio_embeds"], batch 1, the same for every row), or None
    audio_key                    the content key of the audio patch weights the group holds (AudioLoad)
                                 that attend to audio_tokens after every block's cross-attention, or None
    audio_scale                  the audio patch's output scale (x <- x + scale * audio_attention(x))
    audio_ref_masks              [2, reference tokens] two speakers' masks over the first tokens (the
                                 reference image's: InfiniteTalk's MultiTalkGetAttnMapPatch), or None (one speaker)
    """

    hidden_states: typing.Any
    timestep: typing.Any
    encoder_hidden_states: typing.Any
    encoder_hidden_states_image: typing.Any = None
    control_hidden_states: typing.Any = None
    control_hidden_states_scale: Optional[list] = None
    skip_blocks: Optional[list] = None
    rope_options: Optional[dict] = None
    compile: bool = False
    uni3c_input: typing.Any = None
    uni3c: Optional[dict] = None
    audio_tokens: typing.Any = None
    audio_key: Optional[str] = None
    audio_scale: float = 1.0
    audio_ref_masks: typing.Any = None

    TENSORS: typing.ClassVar[tuple[str, ...]] = (
        "hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image", "control_hidden_states",
        "uni3c_input", "audio_tokens", "audio_ref_masks",
    )
    # tensors that are not per batch row: moved whole (Uni3C's control rows are picked by their user,
    # runner._uni3c_call; the audio tokens and masks are every row's)
    SHARED: typing.ClassVar[tuple[str, ...]] = ("uni3c_input", "audio_tokens", "audio_ref_masks")

    def tensors(self) -> dict:
        """{name: tensor} of the tensors that are present."""
        return {n: getattr(self, n) for n in self.TENSORS if getattr(self, n) is not None}

    @property
    def batch(self) -> int:
        return self.hidden_states.shape[0]


# ---- requests ---------------------------------------------------------------------------------------
@dataclass
class Ping:
    pass


@dataclass
class Shutdown:
    pass


@dataclass
class Load:
    key: str
    path: str
    info: dict  # the owner's CheckpointInfo (dataclasses.asdict): the header is read and checked once
    placement: str = "replicated"  # "replicated" | "fsdp" (runner.ModelRunner.placement), chosen by the owner's memory plan


@dataclass
class Unload:
    key: str


@dataclass
class Forward:
    key: str
    arena: str
    inputs: dict[str, TensorSpec]  # ForwardInputs.TENSORS that are present
    out: TensorSpec  # the region each group leader writes its rows of the output into
    control_scale: Optional[list] = None
    skip_blocks: Optional[list] = None
    rope_options: Optional[dict] = None
    compile: bool = False
    uni3c: Optional[dict] = None
    audio: Optional[dict] = None  # {"key": AudioLoad key, "scale": float} with the input audio_tokens


@dataclass
class Uni3CLoad:
    """Hold this Uni3C control net (uni3c.Uni3CNet kwargs `config`, weights in the arena under
    ComfyUI's names) under `key` in the group's compute dtype, replacing any held before."""

    key: str  # launcher.uni3c_key: the weights' content
    arena: str
    tensors: dict[str, TensorSpec]
    config: dict


@dataclass
class Uni3CLoaded:
    param_bytes: int
    memory: Optional[MemoryStats] = None


@dataclass
class WeightPatch:
    """One of ComfyUI's patch entries on one weight (comfy.lora.calculate_weight's order and
    arithmetic, in fp32): first W <- strength_model * W, then by `kind`

      "lora"    W += strength * up @ down        tensors [up, down] (alpha / rank folded into strength)
      "diff"    W += strength * delta            tensors [delta]
      "set"     W <- value                       tensors [value]; the strengths are ignored, as ComfyUI does
      "weight"  W += strength * W2               W2: tensor `name` (diffusers name) of the checkpoint at
                                                 `path`, this rank's rows, with `patches` applied to it
                                                 first: a model merge, the second model's own patches

    Tensors are full-size (a rank slices its rows); `tensors` are TensorSpecs on the wire and tensors
    once the worker has viewed them in the arena."""

    kind: str
    tensors: list[TensorSpec] = field(default_factory=list)  # torch tensors on either side of the wire
    strength: float = 1.0
    strength_model: float = 1.0
    path: str = ""
    name: str = ""
    patches: list[WeightPatch] = field(default_factory=list)

    KINDS: typing.ClassVar[tuple[str, ...]] = ("lora", "diff", "set", "weight")

    def all_tensors(self) -> list:
        """Its tensors and those of its nested patches, depth first."""
        return list(self.tensors) + [t for p in self.patches for t in p.all_tensors()]

    def map_tensors(self, fn) -> WeightPatch:
        """A copy with every tensor (nested ones too) replaced by fn(tensor)."""
        return dataclasses.replace(self, tensors=[fn(t) for t in self.tensors],
                                   patches=[p.map_tensors(fn) for p in self.patches])


@dataclass
class Memory:
    """Report this rank's memory; with `trim`, first release what the caching allocator holds
    unused (gc.collect() and torch.cuda.empty_cache()), so the figures are after trimming."""

    trim: bool = False


@dataclass
class SetWeightPatches:
    """Make `patches` the weight patches of model `key` (LoRAs, merges, strength_model, set):
    {diffusers weight name: [WeightPatch, ...]} in ComfyUI's order; {} restores the file's weights."""

    key: str
    arena: str  # "" when no patch has a tensor
    patches: dict[str, list[WeightPatch]]


@dataclass
class VaeLoad:
    """Hold this Wan VAE (diffusers AutoencoderKLWan kwargs `config`, weights in the arena under
    diffusers' names) under `key` in `dtype`, replacing any VAE held before (one per group)."""

    key: str  # launcher.vae_key: the weights' content and the dtype
    arena: str
    tensors: dict[str, TensorSpec]
    config: dict
    dtype: str  # "bf16" | "fp16" | "fp32"


@dataclass
class VaeDecode:
    """Decode the latent `input` [B, z, T, H, W] (whole, fp32) split by rows (parallel/sp_vae.py);
    every rank writes its pixel rows of `out` (fp32): the video [B, C, 1 + 4(T-1), H*s, W*s] in
    [-1, 1], or with `image` ComfyUI's IMAGE [B * (1 + 4(T-1)), H*s, W*s, C] in [0, 1]."""

    key: str
    arena: str
    input: TensorSpec
    out: TensorSpec
    image: bool = False
    schedule: str = ""  # sp_vae.DECODE_SCHEDULES: how the frames go through the finer scales ("": the default)


@dataclass
class VaeEncode:
    """Encode the video `input` [B, C, F, H, W] (whole, fp32, [-1, 1]) split by rows; every rank
    writes its latent rows of the posterior mean `out` [B, z, 1 + (F-1)//4, H/s, W/s] (fp32)."""

    key: str
    arena: str
    input: TensorSpec
    out: TensorSpec


@dataclass
class AudioLoad:
    """Hold these audio patch weights (InfiniteTalk / MultiTalk per-block audio cross-attention) under
    `key`, replacing any held before (one per group), in the compute dtype. `tensors`: for each
    transformer block i, `blocks.{i}.norm_x.{weight,bias}` (LayerNorm, eps `eps`) and
    `blocks.{i}.audio_cross_attn.{q_linear,kv_linear,proj}.{weight,bias}`; `num_heads`: the audio
    attention's own head count."""

    key: str  # launcher.content_key of the weights
    arena: str
    tensors: dict[str, TensorSpec]
    num_heads: int
    eps: float = 1e-5


# ---- replies ----------------------------------------------------------------------------------------
@dataclass
class MemoryStats:
    """One rank's memory (the reply to `Memory`, and carried by `Loaded` and `ForwardDone`).

    device: the rank's CUDA device index as the worker numbers it (its own CUDA_VISIBLE_DEVICES);
    WorkerGroup.memory() and .memory_stats give it in the owner's numbering. -1 on the CPU, where
    allocated and reserved are 0 (no caching allocator to ask)."""

    rank: int
    device: int
    allocated: int  # torch.cuda.memory_allocated: bytes in live tensors
    reserved: int  # torch.cuda.memory_reserved: what the caching allocator holds (what nvidia-smi shows, less the context)
    param_bytes: int = 0  # parameter bytes of every model this rank holds (the VAE's included)
    trims: int = 0  # how often this rank has trimmed its cache (after loads, unloads, LoRA sets, Memory(trim=True))


@dataclass
class Pong:
    rank: int
    models: list[str]


@dataclass
class Loaded:
    load_s: float
    backend: str
    layout: Layout
    fallback_layout: Layout
    variant: str
    num_heads: int
    in_channels: int
    out_channels: int
    patch_size: list
    memory_bytes: Optional[int]
    placement: str = "replicated"
    compiled: bool = False  # the blocks' per-token work runs through torch.compile (config.compile)
    fp8_matmul: bool = False  # the blocks' Linear layers multiply in fp8 (config.fp8_matmul)
    fp8_input_scaling: str = ""  # with fp8_matmul: "token" (row-wise _scaled_mm) or "tensor" (where it has no row-wise scales)
    param_bytes: int = 0  # parameter bytes this rank holds between forwards
    param_bytes_total: int = 0  # the whole model's, as held (storage dtypes)
    param_bytes_per_rank: list = field(default_factory=list)  # every rank's param_bytes (set by the owner)
    memory_plan: Optional[dict] = None  # the owner's estimate (parallel/memory.py), set by the owner
    peak_estimate: int = 0  # this model's per-rank peak at the planned size, or the model's standard size (set by the owner)
    memory: Optional[MemoryStats] = None  # the rank's memory after the load (the owner keeps it in WorkerGroup.memory_stats)
    link: Optional[dict] = None  # the group's link probe (linkprobe.LinkProbe.as_dict), measured at its first load
    # How `layout` and `fallback_layout` were chosen: {"rule": "cost model" | "static" | "configured",
    # "size": the video size predicted for, "predicted_s": {batch: {layout: seconds}}} (cost model only)
    layout_choice: Optional[dict] = None


@dataclass
class ForwardDone:
    ms: float  # the transformer forward on this rank
    in_ms: float  # reading and moving its inputs
    out_ms: float  # writing its rows of the output (group leaders)
    layout: Layout
    pinned: bool
    peak_bytes: Optional[int]
    memory: Optional[MemoryStats] = None  # the rank's memory after the forward
    compiled: bool = False  # the blocks' per-token work ran compiled
    stream_tokens: int = 0  # tokens of a batch row this rank's blocks took in (its shard of the stream)


@dataclass
class WeightsPatched:
    patched: int  # weights this rank changed


@dataclass
class VaeLoaded:
    load_s: float
    param_bytes: int
    memory: Optional[MemoryStats] = None


@dataclass
class VaeDone:
    ms: float  # the VAE on this rank
    rows: list  # [start, stop) of the output rows this rank wrote
    peak_bytes: Optional[int]  # torch.cuda.max_memory_allocated in the run (None on the CPU)
    peak_rss: int = 0  # the process's peak resident set (bytes; on the CPU the only peak there is)
    schedule: str = ""  # a decode's schedule as run (sp_vae.DECODE_SCHEDULES name or pieces; "auto" resolved)


@dataclass
class Failed:
    """A request raised on a rank. `time` is CLOCK_MONOTONIC (one clock for every process), so the
    owner blames the rank that failed first whatever order the replies arrive in."""

    rank: int
    type: str
    message: str
    traceback: str
    time: float


@dataclass
class Done:
    """A request that returns nothing."""


MESSAGES = {cls.__name__: cls for cls in (
    Ping, Shutdown, Load, Unload, Forward, Memory, SetWeightPatches, Pong, MemoryStats, Loaded, ForwardDone, WeightsPatched,
    Failed,
    Done, VaeLoad, VaeDecode, VaeEncode, VaeLoaded, VaeDone, Uni3CLoad, Uni3CLoaded, AudioLoad,
)}


def encode(msg) -> tuple[str, dict]:
    kind = type(msg).__name__
    assert MESSAGES.get(kind) is type(msg), f"{kind} is not a protocol message"
    return kind, _plain(msg)


def decode(wire):
    kind, fields = wire
    cls = MESSAGES.get(kind)
    if cls is None:
        raise ValueError(f"unknown message kind {kind!r}")
    return _build(cls, fields)


def _plain(v):
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return type(v)(_plain(x) for x in v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _build(cls, fields: dict):
    hints = typing.get_type_hints(cls)
    return cls(**{name: _typed(hints[name], value) for name, value in fields.items()})


def _typed(tp, v):
    if v is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        return _typed(next(a for a in args if a is not type(None)), v)
    if dataclasses.is_dataclass(tp):
        return _build(tp, v)
    if origin is dict and args:
        return {k: _typed(args[1], x) for k, x in v.items()}
    if origin is list and args:
        return [_typed(args[0], x) for x in v]
    if tp is tuple or origin is tuple:
        return tuple(v)
    return v

