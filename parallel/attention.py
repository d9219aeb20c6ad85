"""USP self-attention (Ulysses all-to-all + ring) that ignores padded keys.

yunchang provides the communication: `SeqAllToAll4D` (Ulysses) and `RingComm` +
`update_out_and_lse` (ring). Its `LongContextAttention` has no key mask, and the sequence must be
padded to a multiple of the world size, so this module composes the same pieces with one addition:
every kernel call sees only the real keys of the block it attends to. Results therefore do not
depend on the number of ranks (the Wan2.1 reference implementation lets padded keys leak in).

Layout convention: q, k, v and the output are [batch, tokens, heads, head_dim] (yunchang's).

Overlap (`CommOptions.overlap`, on by default): attention is independent per head, so the heads a
rank attends to are split into G head groups and the exchange of one group runs while another
group's attention computes (`_ulysses_pipelined`: the all-to-all in of group g+1 and the
all-to-all out of group g-1 during the attention of group g; `_ring_pipelined`: every group's
first key/value exchange during the step-0 attention of all groups, then each group's next step as
soon as its own blocks have arrived). The collectives are torch.distributed's async ones (NCCL
runs them on its own stream, gloo on its own thread); each kernel sees the same numbers for each
head as before, so the result is the same up to a kernel's rounding for a different head count.
With overlap off the exchange is yunchang's, as before.

Wire (`CommOptions.wire`, opt-in "fp8"): the all-to-alls (and the pure ring's key/value exchange)
carry e4m3 values with one fp32 scale per token and head (`encode_fp8` / `decode_fp8`): about
0.53x the bytes of bf16, not exact.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
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

# At most this many head groups per exchange (overlap): more groups hide more of the exchange (all
# but about 1/G of it is behind attention) but make smaller kernels and more collective calls.
# XDIT_USP_HEAD_GROUPS overrides it (tuning, benchmarks).
MAX_HEAD_GROUPS = 10


@dataclass(frozen=True)
class CommOptions:
    """How a sequence-parallel group exchanges q, k, v and the attention output.

    overlap      pipeline the exchange with attention by head groups (exact); off: yunchang's
                 blocking all-to-alls and ring loop, as before.
    wire         "default": the compute dtype; "fp8": e4m3 with a per-token, per-head fp32 scale
                 (opt-in, not exact; CUDA with bf16/fp16 only, checked by the config).
    head_groups  the number of head groups (0: the largest divisor of the heads a rank attends
                 to that is <= MAX_HEAD_GROUPS, or XDIT_USP_HEAD_GROUPS when set)."""

    overlap: bool = True
    wire: str = "default"
    head_groups: int = 0

    @classmethod
    def from_config(cls, config, link=None) -> "CommOptions":
        """The config's exchange; `comm_overlap='auto'` decided by `link` (linkprobe.overlap_for)."""
        from .linkprobe import overlap_for
        return cls(overlap=overlap_for(config, link), wire=config.comm_dtype)

    def groups(self, heads: int) -> int:
        """The number of head groups for `heads` heads (1 without overlap)."""
        if not self.overlap:
            return 1
        cap = self.head_groups or int(os.environ.get("XDIT_USP_HEAD_GROUPS", "0") or 0) or MAX_HEAD_GROUPS
        return max(d for d in range(1, heads + 1) if heads % d == 0 and d <= cap)


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
    comm: CommOptions = field(default_factory=CommOptions)
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


def build_sp_group(cfg: int, ulysses: int, ring: int, tensor: int = 1, pipeline: int = 1,
                   comm: Optional[CommOptions] = None) -> SPGroup:
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
        comm=comm or CommOptions(),
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
    """`usp_attention` of the list [q, k, v], which it empties: each tensor is dropped as soon as it
    has been packed for (or replaced by) its exchange, so with no other reference held by the caller
    about four q-sized tensors are alive during the exchange instead of six.

    With `group.comm.overlap` (or the fp8 wire) the exchange is pipelined by head groups
    (`_ulysses_pipelined`, `_ring_pipelined`); otherwise it is yunchang's blocking path."""
    comm = group.comm
    if comm.overlap or comm.wire != "default":
        if group.ulysses > 1:
            return _ulysses_pipelined(qkv, group, backend, valid_len, scale)
        if group.ring > 1:
            q, k, v = qkv
            qkv.clear()
            return _ring_pipelined(q, k, v, group, backend, valid_len, scale)
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


# The fp8 wire -----------------------------------------------------------------------------------
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def encode_fp8(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D + 4] bytes: the e4m3 values of each row (a token's head) scaled by the
    row's max |x| / 448, followed by that scale's four fp32 bytes. One buffer, one collective."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return torch.cat([q.view(torch.uint8), scale.view(torch.uint8)], dim=-1)


def decode_fp8(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`encode_fp8`'s inverse, [..., D + 4] bytes -> [..., D] in `dtype`."""
    d = b.shape[-1] - 4
    scale = b[..., d:].contiguous().view(torch.float32)
    return (b[..., :d].view(torch.float8_e4m3fn).float() * scale).to(dtype)


# Overlapped exchanges ----------------------------------------------------------------------------
def _a2a(send: torch.Tensor, pg) -> tuple[torch.Tensor, object]:
    """All-to-all over dim 0 (chunk p goes to rank p of `pg`), started asynchronously:
    (receive buffer, work). The caller keeps `send` alive until work.wait()."""
    recv = torch.empty_like(send)
    return recv, dist.all_to_all_single(recv, send, group=pg, async_op=True)


def _ulysses_pipelined(qkv: list, group: SPGroup, backend: AttentionBackend, valid_len: int,
                       scale: float) -> torch.Tensor:
    """Ulysses (and hybrid Ulysses x ring) attention with the all-to-alls pipelined by head groups.

    After the all-to-all a rank attends to H/u heads; they are split into G groups of hg heads
    (group g: heads g*hg .. of every rank's slice). q, k and v of one group travel in one
    all-to-all, [u, 3, B, S, hg, D] (dim 0: the destination rank). On the collective stream the
    order is in(0), in(1), out(0), in(2), out(1), ...: while group g's attention computes, group
    g-1's output goes back and group g+1's inputs arrive. Only in(0) and out(G-1) are exposed.
    Attention is per head, so each head's result is what the blocking path computes."""
    q, k, v = qkv
    qkv.clear()
    B, S, H, D = q.shape
    u, dtype, pg = group.ulysses, q.dtype, group.ulysses_pg
    G = group.comm.groups(H // u)
    hg = H // u // G
    fp8 = group.comm.wire == "fp8"
    sends = [q.new_empty(u, 3, B, S, hg, D) for _ in range(G)]
    tensors = [q, k, v]
    del q, k, v
    for i in range(3):  # each of q, k, v is freed once packed: at most five q-sized tensors at once
        heads = tensors[i].view(B, S, u, G, hg, D)
        tensors[i] = None
        for g in range(G):
            sends[g][:, i].copy_(heads[:, :, :, g].permute(2, 0, 1, 3, 4))
        del heads
    if fp8:
        sends = [encode_fp8(s) for s in sends]

    if group.ring == 1:
        def attend(qg, kg, vg):
            return backend.plain(qg, kg[:, :valid_len], vg[:, :valid_len], scale)
    else:
        def attend(qg, kg, vg):
            return _ring_attention(qg, kg, vg, group, backend, valid_len, qg.shape[1], scale)

    out = torch.empty(B, S, H, D, dtype=dtype, device=sends[0].device)
    heads_out = out.view(B, S, u, G, hg, D)

    def land(g, recv, work, sent):  # group g's output is back (`sent` lived until now): into its heads of `out`
        work.wait()
        if fp8:
            recv = decode_fp8(recv, dtype)
        heads_out[:, :, :, g].copy_(recv.permute(1, 2, 0, 3, 4))

    incoming = {0: _a2a(sends[0], pg)}
    outgoing = None
    for g in range(G):
        if g + 1 < G:
            incoming[g + 1] = _a2a(sends[g + 1], pg)
        recv, work = incoming.pop(g)
        work.wait()
        sends[g] = None
        if fp8:
            recv = decode_fp8(recv, dtype)
        # [u, B, S, hg, D] per tensor -> [B, u*S, hg, D]: the whole ring block, sources in rank order
        qg, kg, vg = (recv[:, i].transpose(0, 1).reshape(B, u * S, hg, D) for i in range(3))
        del recv
        og = attend(qg, kg, vg).to(dtype)
        del qg, kg, vg
        back = og.unflatten(1, (u, S)).transpose(0, 1).contiguous()  # [u, B, S, hg, D]: tokens to their rank
        del og
        if fp8:
            back = encode_fp8(back)
        recv_out, work_out = _a2a(back, pg)
        if outgoing is not None:
            land(*outgoing)
        outgoing = (g, recv_out, work_out, back)
        del back
    land(*outgoing)
    return out


def _ring_pipelined(q, k, v, group: SPGroup, backend: AttentionBackend, valid_len: int, scale: float):
    """Ring attention (no Ulysses) with the key/value exchange split by head groups.

    Step 0 starts every group's exchange, then attends to the rank's own keys for all heads, so the
    transfer runs behind a whole step of attention; at each later step group g attends as soon as
    its own blocks have arrived (and passes them on first when more steps follow), so group g's
    compute overlaps the transfer of groups > g. The blocks and the merge (yunchang's
    `update_out_and_lse`, per head) are the blocking loop's."""
    from yunchang.ring.utils import update_out_and_lse

    B, S, H, D = q.shape
    pg, dtype = group.ring_pg, q.dtype
    R, rank = dist.get_world_size(pg), dist.get_rank(pg)
    send_to, recv_from = dist.get_global_rank(pg, (rank + 1) % R), dist.get_global_rank(pg, (rank - 1) % R)
    G = group.comm.groups(H)
    hg = H // G
    fp8 = group.comm.wire == "fp8"
    hs = [slice(g * hg, (g + 1) * hg) for g in range(G)]

    def exchange(buf):  # -> (receive buffer, works, the buffer sent: alive until the works are waited on)
        recv = torch.empty_like(buf)
        ops = [dist.P2POp(dist.isend, buf, send_to, group=pg), dist.P2POp(dist.irecv, recv, recv_from, group=pg)]
        return recv, dist.batch_isend_irecv(ops), buf

    # this rank's own blocks, one buffer per group: [2, B, S, hg, D] (k, v), or its fp8 bytes
    payload = [torch.stack([k[:, :, h], v[:, :, h]]) for h in hs]
    if fp8:
        payload = [encode_fp8(p) for p in payload]
    pending = [exchange(p) for p in payload] if R > 1 else []
    out, lse = [None] * G, [None] * G

    def attend(g, step, kg, vg):
        source = (rank - step) % R  # ring rank whose keys these are
        n_valid = min(max(valid_len - source * S, 0), S)
        if n_valid > 0:
            block_out, block_lse = backend.lse(q[:, :, hs[g]], kg[:, :n_valid], vg[:, :n_valid], scale)
            out[g], lse[g] = update_out_and_lse(out[g], lse[g], block_out, block_lse)

    for g in range(G):  # step 0: the own keys, exact (not through the wire)
        attend(g, 0, k[:, :, hs[g]], v[:, :, hs[g]])
    del k, v
    for step in range(1, R):
        for g in range(G):
            recv, works, sent = pending[g]
            for w in works:
                w.wait()
            payload[g] = None
            del sent
            if step + 1 < R:
                pending[g] = exchange(recv)
            kv = decode_fp8(recv, dtype) if fp8 else recv
            attend(g, step, kv[0], kv[1])
            del kv, recv
    return torch.cat([o.to(dtype) for o in out], dim=2)


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
