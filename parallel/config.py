"""`XDitUSPConfig`: how one Wan transformer is spread over a group of worker processes.

The config is validated twice: `validate()` checks what is knowable without a model (degrees,
device count, dtype, backend names), `resolve(num_heads)` fixes the "auto" degrees once the
checkpoint's head count is known. Both raise `ValueError` saying what would work instead, before
any process is started.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from .attention import AttentionBackend

AUTO = 0  # a degree of 0 means "choose for me"


class ConfigError(ValueError):
    """A configuration that cannot work, found before any process starts.

    The message names settings by their field names (`world_size`, `ring_degree`, `device='cpu'`);
    `render(labels)` words it for the interface the user touched, e.g. the CLI's `--gpus`."""

    def render(self, labels: dict[str, str]) -> str:
        msg = str(self)
        for name in sorted(labels, key=len, reverse=True):
            msg = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w])", labels[name], msg)
        return msg

DTYPES = ("bf16", "fp16", "fp32")
# How the weights are held on the GPUs (see parallel/runner.py, parallel/memory.py):
#   none  every rank holds the whole model;
#   fsdp  every parameter is split across all ranks of the group (PyTorch FSDP2) and each block is
#         gathered just before it runs, the next one's gather overlapping the current block;
#   auto  fsdp when the memory plan says the model does not fit unsharded, else none.
WEIGHT_SHARDING = ("none", "fsdp", "auto")
# The dtype the weights are stored in between uses. default: the compute dtype, except that weights a
# file stores as fp8 stay fp8; fp8_*: every Linear weight is stored in that fp8 format and upcast to
# the compute dtype when its layer runs (half the memory of bf16; not exact against bf16 weights).
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e5m2")
DEVICES = ("cuda", "cpu")
# What q/k/v and the attention output travel as between ranks (parallel/attention.py): the compute
# dtype, or e4m3 with a per-token, per-head scale (opt-in, not exact).
COMM_DTYPES = ("default", "fp8")
# Whether the sequence-parallel exchange is pipelined with attention by head groups (exact either way):
#   on    always; off  never (yunchang's blocking all-to-alls and ring loop);
#   auto  by the link the group measured at its first load (linkprobe.overlap_for): on where the
#         probe's faster transfer runs below OVERLAP_BELOW_GBPS (PCIe without peer-to-peer), off on
#         NVLink-class links, where splitting attention into head groups costs more than it hides;
#         on on the CPU.
COMM_OVERLAP = ("auto", "on", "off")
# Names accepted for `attention_backend`; see parallel/attention.py for what each runs.
ATTENTION_BACKENDS = ("auto", "sdpa", "cudnn", "flash", "efficient", "math", "cpu_flash", "flash_attn", "fa3", "sage")

# Keys of the original seed example that we accept. Each maps to its default; a key that is not
# implemented raises when set to anything else, rather than being ignored.
_UNIMPLEMENTED_DEFAULTS = {
    "enable_activation_checkpointing": False,
}
# The seed's names for settings that have ours (from_dict maps them).
_ALIASES = {"tensor_parallel_size": "tensor_parallel_degree", "pipeline_parallel_size": "pipeline_parallel_degree"}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Layout:
    """Concrete degrees: world = pipeline * tensor * cfg * ulysses * ring.

    Rank order, outermost first: pipeline stage, tensor rank, CFG slice, ring, Ulysses (see
    attention.build_sp_group). Tensor and pipeline are outside the CFG split so that a rank keeps
    its weight shard in the batch-1 fallback layout, where the CFG ranks join the sequence ranks."""

    cfg: int
    ulysses: int
    ring: int
    tensor: int = 1
    pipeline: int = 1

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.cfg * self.sp * self.tensor * self.pipeline

    def __str__(self) -> str:
        split = (f"pipeline{self.pipeline}x" if self.pipeline > 1 else "") + (f"tensor{self.tensor}x" if self.tensor > 1 else "")
        return f"{split}cfg{self.cfg}xulysses{self.ulysses}xring{self.ring}"


@dataclass
class XDitUSPConfig:
    """Parallel layout and runtime settings for one worker group.

    world_size      number of worker processes (one per GPU; CPU ranks when device == "cpu").
    ulysses_degree  Ulysses (all-to-all over heads) degree; 0 = auto. Must divide the head count.
    ring_degree     ring-attention degree; 0 = auto.
    cfg_degree      batch split (cond / uncond on separate rank groups); 0 = auto (2 when the world
                    size is even, else 1). A batch that does not divide by it runs on all ranks.
    dtype           compute dtype of the transformer: bf16 | fp16 | fp32.
    attention_backend  auto | sdpa | cudnn | flash | efficient | math | cpu_flash | flash_attn | fa3 | sage
                    (sage: SageAttention's 8-bit kernels, opt-in and not exact; Ulysses only).
    device          cuda | cpu.  device_ids: which GPUs (default: 0..world_size-1).
    tensor_parallel_degree  Megatron-style tensor parallelism (seed key `tensor_parallel_size`): each
                    rank holds heads / N of every attention layer and 1/N of every FFN; 1 = off.
    pipeline_parallel_degree  contiguous block stages (seed key `pipeline_parallel_size`): each rank
                    holds num_layers / N blocks, hidden states pass point to point; 1 = off.
                    world_size = pipeline × tensor × cfg × ulysses × ring.
    weight_sharding none | fsdp | auto: whether each rank holds the whole model or a 1/N shard of it.
    weight_dtype    default | fp8_e4m3fn | fp8_e5m2: how the Linear weights are stored between uses.
    compile         torch.compile the per-token work of every transformer block on the workers
                    (regional: norms, modulation, residuals, FFN, q/k projection + RoPE; the
                    collectives and attention kernels stay eager). The same math, rounded
                    differently by fused kernels; the first forward at a new size compiles.
    fp8_matmul      the blocks' Linear layers multiply in fp8 (torch._scaled_mm: e4m3 weights, activations
                    quantised per token), ComfyUI's "fp8_e4m3fn_fast"; weights are then held as
                    fp8_e4m3fn (weight_dtype default means that). Opt-in, not exact.
    comm_overlap    auto | on | off: pipeline the sequence-parallel exchange with attention by head
                    groups (exact either way). auto: on where the link probe measures a slow link,
                    off on NVLink-class links (COMM_OVERLAP). true / false are read as on / off.
    comm_dtype      default | fp8: what q/k/v and the attention output travel as; fp8 (e4m3, one scale
                    per token and head) halves the bytes on the wire. Opt-in, not exact; CUDA, bf16/fp16.
    gpu_memory_fraction  per-process cap on the CUDA caching allocator, (0, 1]; the memory plan checks
                    a model fits under it before anything is loaded.
    launch_timeout_s / forward_timeout_s / load_timeout_s  every wait on the workers is bounded.
    heartbeat_timeout_s  a rank silent this long (dead, hung, stopped) is reported, whatever the
                    forward timeout: every rank sends a heartbeat each second.
    """

    world_size: int = 1
    ulysses_degree: int = AUTO
    ring_degree: int = AUTO
    cfg_degree: int = AUTO
    dtype: str = "bf16"
    attention_backend: str = "auto"
    device: str = "cuda"
    weight_sharding: str = "auto"
    weight_dtype: str = "default"
    compile: bool = False
    fp8_matmul: bool = False
    comm_overlap: str = "auto"
    comm_dtype: str = "default"
    device_ids: Optional[list[int]] = None
    gpu_memory_fraction: float = 1.0
    launch_timeout_s: float = 300.0
    load_timeout_s: float = 1800.0
    forward_timeout_s: float = 900.0
    heartbeat_timeout_s: float = 10.0
    tensor_parallel_degree: int = 1
    pipeline_parallel_degree: int = 1
    # Accepted from the seed's example config; see _UNIMPLEMENTED_DEFAULTS.
    enable_activation_checkpointing: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------------
    def __post_init__(self):
        if isinstance(self.comm_overlap, bool):  # the earlier boolean setting (configs saved before "auto")
            self.comm_overlap = "on" if self.comm_overlap else "off"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "XDitUSPConfig":
        """Build from a dict; understands the seed's keys (`num_gpus`, `use_fp16`)."""
        d = dict(d)
        if "num_gpus" in d:
            d.setdefault("world_size", d.pop("num_gpus"))
        if "use_fp16" in d:
            if d.pop("use_fp16"):
                d["dtype"] = "fp16"
        for seed, ours in _ALIASES.items():
            if seed in d:
                value = d.pop(seed)
                if ours in d and d[ours] != value:
                    raise ConfigError(f"XDitUSPConfig: {seed}={value!r} and {ours}={d[ours]!r} disagree (the same setting)")
                d[ours] = value
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        names |= set(_ALIASES)
        if unknown:
            raise ConfigError(f"XDitUSPConfig: unknown keys {unknown}; known keys: {sorted(names)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, s: str) -> "XDitUSPConfig":
        return cls(**json.loads(s))

    @property
    def num_gpus(self) -> int:
        return self.world_size

    # ---- validation ---------------------------------------------------------------------------
    def validate(self, visible_gpus: Optional[int] = None) -> "XDitUSPConfig":
        """Checks that need no model. `visible_gpus` defaults to torch.cuda.device_count()."""
        errors = []
        for key, default in _UNIMPLEMENTED_DEFAULTS.items():
            if getattr(self, key) != default:
                errors.append(
                    f"{key}={getattr(self, key)!r} is not implemented yet (only {default!r}); "
                    "more sequence ranks (ulysses_degree / ring_degree) split the activations"
                )
        if not isinstance(self.world_size, int) or self.world_size < 1:
            errors.append(f"world_size must be an integer >= 1, got {self.world_size!r}")
        if self.dtype not in DTYPES:
            errors.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES:
            errors.append(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            errors.append(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.weight_sharding not in WEIGHT_SHARDING:
            errors.append(f"weight_sharding must be one of {WEIGHT_SHARDING}, got {self.weight_sharding!r}")
        if self.weight_dtype not in WEIGHT_DTYPES:
            errors.append(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {self.weight_dtype!r}")
        if self.comm_dtype not in COMM_DTYPES:
            errors.append(f"comm_dtype must be one of {COMM_DTYPES}, got {self.comm_dtype!r}")
        elif self.comm_dtype == "fp8" and (self.device != "cuda" or self.dtype == "fp32"):
            errors.append(f"comm_dtype='fp8' sends bf16/fp16 activations as fp8 between GPUs; it needs device='cuda' "
                          f"and dtype bf16 or fp16 (got device={self.device!r}, dtype={self.dtype!r}); use "
                          "comm_dtype='default'")
        if self.comm_overlap not in COMM_OVERLAP:
            errors.append(f"comm_overlap must be one of {COMM_OVERLAP}, got {self.comm_overlap!r}")
        for name in ("compile", "fp8_matmul"):
            if not isinstance(getattr(self, name), bool):
                errors.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.fp8_matmul and self.weight_dtype == "fp8_e5m2":
            errors.append("fp8_matmul multiplies e4m3 weights; weight_dtype='fp8_e5m2' cannot be used with it "
                          "(use weight_dtype='fp8_e4m3fn' or 'default')")
        if not (0.0 < float(self.gpu_memory_fraction) <= 1.0):
            errors.append(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")
        for name in ("launch_timeout_s", "load_timeout_s", "forward_timeout_s", "heartbeat_timeout_s"):
            if not float(getattr(self, name)) > 0:
                errors.append(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("ulysses_degree", "ring_degree", "cfg_degree"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                errors.append(f"{name} must be an integer >= 0 (0 = auto), got {v!r}")
        for name in ("tensor_parallel_degree", "pipeline_parallel_degree"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                errors.append(f"{name} must be an integer >= 1 (1 = off), got {v!r}")
        if errors:
            raise ConfigError("Invalid XDitUSPConfig: " + "; ".join(errors))

        split = self.tensor_parallel_degree * self.pipeline_parallel_degree
        if split > 1:
            if self.weight_sharding == "fsdp":
                raise ConfigError(
                    "weight_sharding='fsdp' cannot be combined with tensor_parallel_degree / pipeline_parallel_degree "
                    "(they already split the weights); use weight_sharding='none' or 'auto' with them, or fsdp alone")
            if self.compile and self.tensor_parallel_degree > 1:
                raise ConfigError(
                    "compile is not supported with tensor_parallel_degree > 1 (its collectives run inside the "
                    "compiled block functions); use compile with pipeline_parallel_degree, fsdp or the sequence layouts")
        if self.world_size % split:
            works = [(t, p) for t in divisors(self.world_size) for p in divisors(self.world_size // t)]
            raise ConfigError(
                f"tensor_parallel_degree {self.tensor_parallel_degree} × pipeline_parallel_degree "
                f"{self.pipeline_parallel_degree} = {split} does not divide world_size {self.world_size}; with "
                f"world_size {self.world_size} tensor × pipeline can be "
                + ", ".join(f"{t}×{p}" for t, p in works)
            )
        n = self.world_size // split  # the ranks of one model replica's CFG and sequence split
        fixed = [d for d in (self.ulysses_degree, self.ring_degree, self.cfg_degree) if d]
        whole = f"world_size {self.world_size}" if split == 1 else (
            f"world_size {self.world_size} / (tensor_parallel_degree × pipeline_parallel_degree = {split}) = {n}")
        if math.prod(fixed) > n or n % math.prod(fixed) != 0:
            raise ConfigError(
                f"ulysses_degree × ring_degree × cfg_degree must equal {whole}; got "
                f"ulysses={self.ulysses_degree or 'auto'}, ring={self.ring_degree or 'auto'}, "
                f"cfg={self.cfg_degree or 'auto'}. Degrees that multiply to {n}: "
                + ", ".join(f"{a}×{n // a}" for a in divisors(n))
            )
        if len(fixed) == 3 and math.prod(fixed) != n:
            raise ConfigError(
                f"ulysses {self.ulysses_degree} × ring {self.ring_degree} × cfg {self.cfg_degree} = "
                f"{math.prod(fixed)}, but {whole}"
            )

        if self.device == "cuda":
            if visible_gpus is None:
                import torch

                visible_gpus = torch.cuda.device_count()
            ids = self.device_ids if self.device_ids is not None else list(range(n))
            if len(ids) != n:
                raise ConfigError(f"device_ids {ids} lists {len(ids)} GPUs but world_size is {n}")
            if len(set(ids)) != len(ids):
                raise ConfigError(f"device_ids {ids} repeats a GPU")
            bad = [i for i in ids if not 0 <= i < visible_gpus]
            if bad and visible_gpus == 0:
                raise ConfigError(
                    f"{n} GPU(s) requested but no CUDA device is visible to this process: install a CUDA "
                    "build of torch, check CUDA_VISIBLE_DEVICES, or use device='cpu'"
                )
            if bad:
                raise ConfigError(
                    f"{n} GPU(s) requested (device_ids {ids}) but only {visible_gpus} CUDA device(s) are "
                    f"visible; use world_size <= {visible_gpus}"
                )
        return self

    def resolve(self, num_heads: int) -> Layout:
        """The concrete layout for a model with `num_heads` attention heads."""
        self.validate(visible_gpus=10**6)  # the device count is checked at launch; here only degrees
        n = self.replica_size
        fixed = (self.ulysses_degree or 1) * (self.ring_degree or 1)
        if self.cfg_degree:
            cfg = self.cfg_degree
        elif self.ulysses_degree and self.ring_degree:
            cfg = n // fixed
        else:
            cfg = 2 if n % (2 * fixed) == 0 else 1
        return self._layout(cfg, num_heads)

    def plan(self, num_heads: int) -> tuple[Layout, Layout, AttentionBackend]:
        """(configured layout, batch-1 fallback layout, attention backend) for a model with
        `num_heads` heads: everything the workers will use, checked in the owner before launch
        and computed by the same call on every rank."""
        from .attention import resolve_backend

        layouts = self.resolve(num_heads), self.fallback_layout(num_heads)
        ring = max(layout.ring for layout in layouts)
        try:
            backend = resolve_backend(self.attention_backend, self.device, ring)
        except ConfigError as e:
            if layouts[0].ring < ring:
                raise ConfigError(f"{e} (the batch-1 layout {layouts[1]} uses ring)") from None
            raise
        if backend.name == "sage" and self.dtype == "fp32":
            raise ConfigError("attention_backend 'sage' computes in fp16/bf16; use dtype bf16 or fp16 with it")
        return layouts[0], layouts[1], backend

    def fallback_layout(self, num_heads: int) -> Layout:
        """Layout for a batch the cfg split cannot divide (e.g. batch 1): every rank on the sequence.

        Keeps the configured Ulysses degree and widens the ring; if that cannot work, the automatic
        split of all ranks."""
        try:
            return self._layout(1, num_heads)
        except ValueError:
            n, local = self.replica_size, num_heads // self.tensor_parallel_degree
            u = max(d for d in divisors(n) if local % d == 0)
            return Layout(cfg=1, ulysses=u, ring=n // u, tensor=self.tensor_parallel_degree,
                          pipeline=self.pipeline_parallel_degree)

    @property
    def replica_size(self) -> int:
        """Ranks that hold one copy of every weight between them: world_size / (tensor × pipeline),
        split by the CFG and sequence degrees."""
        return self.world_size // (self.tensor_parallel_degree * self.pipeline_parallel_degree)

    def _layout(self, cfg: int, num_heads: int) -> Layout:
        n = self.replica_size
        tp = self.tensor_parallel_degree
        if num_heads % tp:
            works = [d for d in divisors(num_heads) if d <= self.world_size and self.world_size % d == 0]
            raise ConfigError(
                f"{num_heads} heads: tensor_parallel_degree {tp} does not divide them (each tensor rank holds "
                f"whole heads); with world_size {self.world_size} tensor_parallel_degree {works} work")
        heads = num_heads // tp  # each tensor rank's heads, which Ulysses splits further
        sp = n // cfg
        u, r = self.ulysses_degree, self.ring_degree
        if cfg != self.cfg_degree and u and r and u * r != sp:
            r = 0  # the fallback layout keeps the user's Ulysses degree and widens the ring
        if u and r:
            pass
        elif u:
            r = sp // u if sp % u == 0 else 0
        elif r:
            u = sp // r if sp % r == 0 else 0
        else:
            u = max(d for d in divisors(sp) if heads % d == 0)
            r = sp // u
        whole = f"world_size {n}" if n == self.world_size else f"the {n} ranks of one tensor × pipeline replica"
        if not u or not r or u * r * cfg != n:
            raise ConfigError(
                f"ulysses {self.ulysses_degree or 'auto'} × ring {self.ring_degree or 'auto'} × cfg {cfg} "
                f"cannot make {whole}; with cfg {cfg} the sequence ranks ({sp}) split as "
                + ", ".join(f"ulysses {d} × ring {sp // d}" for d in divisors(sp))
            )
        if heads % u:
            works = [d for d in divisors(sp) if heads % d == 0]
            if tp == 1:
                raise ConfigError(
                    f"{num_heads} heads: Ulysses {works[-1]} works, {u} does not (the Ulysses degree must divide "
                    f"the head count; with {sp} sequence ranks Ulysses {works} work, ring takes the rest)"
                )
            raise ConfigError(
                f"{num_heads} heads: with tensor_parallel_degree {tp} each tensor rank holds {heads}, so Ulysses "
                f"{works[-1]} works, {u} does not (the heads must divide by tensor × Ulysses; with {sp} sequence "
                f"ranks Ulysses {works} work, ring takes the rest)"
            )
        return Layout(cfg=cfg, ulysses=u, ring=r, tensor=tp, pipeline=self.pipeline_parallel_degree)

    @property
    def storage_weight_dtype(self) -> str:
        """How Linear weights are held: `weight_dtype`, except that fp8_matmul holds them as fp8_e4m3fn."""
        return "fp8_e4m3fn" if self.fp8_matmul and self.weight_dtype == "default" else self.weight_dtype

    def torch_dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]

    def visible_device_ids(self) -> list[int]:
        return self.device_ids if self.device_ids is not None else list(range(self.world_size))

