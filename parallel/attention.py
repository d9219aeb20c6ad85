"""USP self-attention (Ulysses all-to-all + ring) that ignores padded keys.

yunchang provides the communication: `SeqAllToAll4D` (Ulysses) and `RingComm` +
`update_out_and_lse` (ring). Its `LongContextAttention` has no key mask, and the sequence must be
padded to a multiple of the world size, so this module composes the same pieces with one addition:
every kernel call sees only the real keys of the block it attends to. Results therefore do not
depend on the number of ranks (the Wan2.1 reference implementation lets padded keys leak in).

Layout convention: q, k, v and the output are [batch, tokens, heads, head_dim] (yunchang's).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import ConfigError

# Kernels ---------------------------------------------------------------------------------------
# Each takes q, k, v as [B, S, H, D] and the softmax scale. `plain` kernels return the output;
# `lse` kernels also return the log-sum-exp [B, H, Sq] in fp32, which the ring needs to merge blocks.


def _bhsd(*ts):
    return [t.transpose(1, 2) for t in ts]


def _sdpa_with(backends):
    def run(q, k, v, scale):
        q, k, v = _bhsd(q, k, v)
        ctx = torch.nn.attention.sdpa_kernel(backends) if backends else contextlib.nullcontext()
        with ctx:
            return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)

    return run


def _cpu_flash_lse(q, k, v, scale):
    q, k, v = _bhsd(q, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[:2]
    return out.transpose(1, 2), lse.float()


def _cuda_flash_lse(q, k, v, scale):
    q, k, v = _bhsd(q, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    return out.transpose(1, 2), lse.float()


def _cudnn_lse(q, k, v, scale):
    q, k, v = _bhsd(q, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, False, False, scale=scale
    )[:2]
    return out.transpose(1, 2), lse.reshape(out.shape[:3]).float()


def _efficient_lse(q, k, v, scale):
    q, k, v = _bhsd(q, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)[:2]
    return out.transpose(1, 2), lse[..., : q.shape[2]].float()


def _flash_attn_lse(q, k, v, scale):
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(q, k, v, softmax_scale=scale, return_attn_probs=True)
    return out, lse.float()


def _flash_attn_plain(q, k, v, scale):
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, softmax_scale=scale)


def _fa3_lse(q, k, v, scale):
    from flash_attn_interface import flash_attn_func

    out, lse = flash_attn_func(q, k, v, softmax_scale=scale, return_attn_probs=True)[:2]
    return out, lse.float()


def _fa3_plain(q, k, v, scale):
    return _fa3_lse(q, k, v, scale)[0]


def _sage_plain(q, k, v, scale):
    from sageattention import sageattn

    return sageattn(q.contiguous(), k.contiguous(), v.contiguous(), tensor_layout="NHD", is_causal=False, sm_scale=scale)


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    plain: Callable  # (q, k, v, scale) -> out
    lse: Optional[Callable]  # (q, k, v, scale) -> (out, lse) or None when the kernel has no LSE


def _backends() -> dict[str, AttentionBackend]:
    B = torch.nn.attention.SDPBackend
    return {
        "sdpa": AttentionBackend("sdpa", _sdpa_with(None), None),
        "math": AttentionBackend("math", _sdpa_with([B.MATH]), None),
        "cpu_flash": AttentionBackend("cpu_flash", _sdpa_with([B.FLASH_ATTENTION]), _cpu_flash_lse),
        "flash": AttentionBackend("flash", _sdpa_with([B.FLASH_ATTENTION]), _cuda_flash_lse),
        "cudnn": AttentionBackend("cudnn", _sdpa_with([B.CUDNN_ATTENTION]), _cudnn_lse),
        "efficient": AttentionBackend("efficient", _sdpa_with([B.EFFICIENT_ATTENTION]), _efficient_lse),
        "flash_attn": AttentionBackend("flash_attn", _flash_attn_plain, _flash_attn_lse),
        "fa3": AttentionBackend("fa3", _fa3_plain, _fa3_lse),
        "sage": AttentionBackend("sage", _sage_plain, None),
    }


def resolve_backend(name: str, device: str, ring_degree: int) -> AttentionBackend:
    """The backend that will run, chosen once per worker group and reported to the owner.

    "auto" is cuDNN SDPA on CUDA (fastest measured on H100, and it returns the log-sum-exp the ring
    needs) and PyTorch's CPU flash kernel on CPU. An explicit choice that cannot run raises here:
    there is no silent fallback to a slower kernel.
    """
    if name == "auto":
        name = "cudnn" if device == "cuda" else ("cpu_flash" if ring_degree > 1 else "sdpa")
    table = _backends()
    if name not in table:
        raise ConfigError(f"unknown attention_backend {name!r}; choose from {sorted(table)}")
    backend = table[name]
    if device == "cpu" and name not in ("sdpa", "math", "cpu_flash"):
        raise ConfigError(f"attention_backend {name!r} needs CUDA; with device='cpu' use sdpa, math or cpu_flash")
    if device == "cuda" and name == "cpu_flash":
        raise ConfigError("attention_backend 'cpu_flash' is the CPU kernel; with device='cuda' use cudnn, flash or efficient")
    if name == "flash_attn":
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            raise ConfigError("attention_backend 'flash_attn' needs the flash-attn package (not installed)") from e
    if name == "sage":
        try:
            import sageattention  # noqa: F401
        except ImportError as e:
            raise ConfigError("attention_backend 'sage' needs the sageattention package (pip install "
                              "sageattention==1.0.6; Triton kernels, CUDA only)") from e
    if name == "fa3":
        try:
            import flash_attn_interface  # noqa: F401
        except ImportError as e:
            raise ConfigError("attention_backend 'fa3' needs FlashAttention-3 (flash_attn_interface, not installed)") from e
    if ring_degree > 1 and backend.lse is None:
        raise ConfigError(
            f"attention_backend {name!r} returns no log-sum-exp, which ring attention (ring degree {ring_degree}) "
            "needs; use cudnn, flash or efficient with device='cuda', cpu_flash with device='cpu', or a layout "
            "without ring (ring_degree 1)"
        )
    return backend


# Process groups ------------------------------------------------------------------------------


@dataclass
class SPGroup:
    """One rank's view of a layout (pipeline × tensor × cfg × ulysses × ring), its process groups
    and neighbours. Global rank = ((stage · tensor + tensor_rank) · cfg + cfg_index) · sp + sp_rank."""

    cfg: int
    ulysses: int
    ring: int
    ulysses_pg: Optional[dist.ProcessGroup]
    ring_pg: Optional[dist.ProcessGroup]
    sp_pg: Optional[dist.ProcessGroup]  # all ranks working on the same batch slice of one stage and tensor rank
    sp_ranks: list[int]  # global ranks of sp_pg, in sequence order
    cfg_index: int  # which batch slice this rank's group computes
    tensor: int = 1
    pipeline: int = 1
    tp_pg: Optional[dist.ProcessGroup] = None  # the ranks holding the other heads / FFN columns of this rank's rows
    tp_rank: int = 0
    stage: int = 0  # pipeline stage: which contiguous run of blocks this rank holds
    stage_stride: int = 0  # global rank distance between a rank and its peer in the next stage

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def sp_rank(self) -> int:
        return self.sp_ranks.index(dist.get_rank()) if dist.is_initialized() else 0

    @property
    def is_leader(self) -> bool:
        return self.sp_rank == 0

    @property
    def writes_output(self) -> bool:
        """Whether this rank returns its CFG slice's output: the sequence leader of the last stage's
        first tensor rank (the other tensor ranks hold the same result)."""
        return self.is_leader and self.tp_rank == 0 and self.stage == self.pipeline - 1


def build_sp_group(cfg: int, ulysses: int, ring: int, tensor: int = 1, pipeline: int = 1) -> SPGroup:
    """Create the process groups of one layout on every rank (a collective call).

    The sequence ranks are innermost and contiguous, so yunchang's `set_seq_parallel_pg` (Ulysses
    ranks adjacent, every other dimension treated as data parallel) makes the Ulysses and ring groups
    of each contiguous run of `ulysses × ring` ranks; the CFG split is next, then the tensor rank,
    then the pipeline stage. Tensor and pipeline are outermost so that a rank's weight shard is the
    same in every layout of its group (the batch-1 fallback folds the CFG ranks into the sequence
    ranks, which are adjacent to them). The groups yunchang made are kept, so several layouts can
    coexist in one worker group.
    """
    from yunchang.globals import PROCESS_GROUP, set_seq_parallel_pg

    world = dist.get_world_size()
    rank = dist.get_rank()
    sp = ulysses * ring
    replica = cfg * sp
    assert replica * tensor * pipeline == world, (pipeline, tensor, cfg, ulysses, ring, world)
    set_seq_parallel_pg(ulysses, ring, rank, world)
    ulysses_pg, ring_pg = PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG
    sp_pg = None
    my_ranks: list[int] = []
    for i in range(world // sp):
        ranks = list(range(i * sp, (i + 1) * sp))
        g = dist.new_group(ranks) if sp > 1 else None
        if rank in ranks:
            sp_pg, my_ranks = g, ranks
    tp_pg = None
    if tensor > 1:
        for stage in range(pipeline):
            for r in range(replica):
                ranks = [(stage * tensor + t) * replica + r for t in range(tensor)]
                g = dist.new_group(ranks)
                if rank in ranks:
                    tp_pg = g
    return SPGroup(
        cfg=cfg,
        ulysses=ulysses,
        ring=ring,
        ulysses_pg=ulysses_pg if ulysses > 1 else None,
        ring_pg=ring_pg if ring > 1 else None,
        sp_pg=sp_pg,
        sp_ranks=my_ranks,
        cfg_index=(rank // sp) % cfg,
        tensor=tensor,
        pipeline=pipeline,
        tp_pg=tp_pg,
        tp_rank=(rank // replica) % tensor,
        stage=rank // (replica * tensor),
        stage_stride=replica * tensor,
    )


# USP attention -------------------------------------------------------------------------------


def usp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: SPGroup,
    backend: AttentionBackend,
    valid_len: int,
    scale: float,
) -> torch.Tensor:
    """Attention over the whole (padded) sequence, of which this rank holds one contiguous shard.

    q, k, v: [B, S_pad / sp, H, D]. Keys at global positions >= valid_len are padding and are
    excluded exactly. Returns this rank's shard of the output, [B, S_pad / sp, H, D].
    """
    return usp_attention_consuming([q, k, v], group, backend, valid_len, scale)


def usp_attention_consuming(qkv: list, group: SPGroup, backend: AttentionBackend, valid_len: int,
                            scale: float) -> torch.Tensor:
    """`usp_attention` of the list [q, k, v], which it empties: each tensor is dropped as soon as its
    all-to-all has replaced it, so with no other reference held by the caller at most four q-sized
    tensors are alive during the exchange instead of six."""
    if group.ulysses > 1:
        from yunchang.comm.all_to_all import SeqAllToAll4D

        # [B, S/sp, H, D] -> [B, S/ring, H/ulysses, D]: this ring block, a slice of the heads
        for i in range(3):
            qkv[i] = SeqAllToAll4D.apply(group.ulysses_pg, qkv[i], 2, 1, False)
    q, k, v = qkv
    qkv.clear()

    block = q.shape[1]  # tokens per ring block after the all-to-all
    if group.ring == 1:
        out = backend.plain(q, k[:, :valid_len], v[:, :valid_len], scale)
    else:
        out = _ring_attention(q, k, v, group, backend, valid_len, block, scale)
    del q, k, v

    if group.ulysses > 1:
        from yunchang.comm.all_to_all import SeqAllToAll4D

        out = SeqAllToAll4D.apply(group.ulysses_pg, out.contiguous(), 1, 2, False)
    return out


def _ring_attention(q, k, v, group: SPGroup, backend: AttentionBackend, valid_len: int, block: int, scale: float):
    """yunchang's basic ring loop, with each visiting key block trimmed to its real tokens."""
    from yunchang.ring.utils import RingComm, update_out_and_lse

    comm = RingComm(group.ring_pg)
    out = lse = None
    for step in range(comm.world_size):
        if step + 1 != comm.world_size:
            next_k, next_v = comm.send_recv(k), comm.send_recv(v)
            comm.commit()
        source = (comm.rank - step) % comm.world_size  # ring rank whose keys we hold now
        n_valid = min(max(valid_len - source * block, 0), block)
        if n_valid > 0:
            block_out, block_lse = backend.lse(q, k[:, :n_valid], v[:, :n_valid], scale)
            out, lse = update_out_and_lse(out, lse, block_out, block_lse)
        if step + 1 != comm.world_size:
            comm.wait()
            k, v = next_k, next_v
    return out.to(q.dtype)
