"""Tensor and pipeline parallelism of a Wan transformer: which rank holds which part of which weight.

Pure rules (`tp_part`, `stage_blocks`, `held_by`), shared by the runner (which builds each rank's
model from them, `runner.TensorPipeline`) and the memory plan (which counts a rank's bytes with them
before anything launches), and the two pieces of arithmetic tensor parallelism adds to a block:

Tensor parallel (Megatron-LM's split of a transformer layer, with its sequence parallelism). In
every block (and VACE block) the q/k/v projections of self- and cross-attention (I2V's
`add_k_proj`/`add_v_proj` too) and the FFN's first Linear are column-parallel: a rank holds `heads /
tensor` whole heads (rows of the weight and bias), the FFN's `ffn_dim / tensor` hidden units. The
attention output projection and the FFN's second Linear are row-parallel: the matching columns of
the weight, the bias on tensor rank 0 only. Wan's q/k RMSNorm normalises over all heads at once
(`rms_norm_across_heads`): `TensorParallelRMSNorm` sums the squares of its own heads and all-reduces
that sum, which gives every rank the global mean of squares; each rank then scales its own heads
with its slice of the norm's weight (exact: the same sum, added in another order).

Between the parallel regions the stream is sequence-sharded across the tensor ranks (Megatron-SP):
of the tokens its sequence group gives it, tensor rank t keeps the t-th of `tensor` equal runs
(padded like the sequence split, sp_wan), and the norms, the modulation (per-token too: Wan 2.2
TI2V), the gated residuals, the VACE hints and the output head run on that run alone, 1/tensor of
the per-token work and of the stream's memory. Before a column-parallel region (self-attention's
q/k/v, cross-attention's q, the FFN's first Linear) `gather_tokens` all-gathers the normed shard
over the tensor group; a row-parallel Linear's partial sums are reduce-scattered back to the shard
(`reduce_scatter_output`, a forward hook), the bias counted once (rank 0). Cross-attention's k/v
come from the context, which every rank holds whole: no gather. All-gather plus reduce-scatter move
the bytes of the one all-reduce they replace. A gathered tensor is [B, tensor * n, ...], rank t's
n tokens at [t * n, (t + 1) * n) (sequence order), so a piece of tokens of the shard takes the same
tokens of every rank's run (`rank_rows`).

Not `torch.distributed.tensor.parallel`: its `SequenceParallel` / `ColwiseParallel(input_layouts=
Shard(1))` / `RowwiseParallel(output_layouts=Shard(1))` make DTensor parameters and activations,
while the block runs our piece-by-piece code on plain tensors (yunchang's Ulysses all-to-all on the
local heads, the q/k norm's all-reduce across heads, pieces of the shard gathered and scattered one
at a time), the loader and LoRA patches write local tensors in place, fp8 Linears carry per-row
scales, and the padded sequence needs its own split; so the same collectives
(`all_gather_into_tensor`, `reduce_scatter_tensor`) are called directly, in the two functions below.
Everything else (embeddings, modulation tables, norms of the residual stream, the output head) is
replicated.

Pipeline parallel. Stage s of P holds a contiguous run of blocks, `stage_blocks` (counts differ by at
most one, the first stages taking the extra block), plus what it runs outside the blocks: the
condition embedder on every stage (each stage computes the timestep and text embeddings itself:
small, and no broadcast to wait for), the patch embedding (and VACE's blocks and embedding) on the
first stage, the output head (`norm_out`, `proj_out`, `scale_shift_table`) on the last.
"""
from __future__ import annotations

import re
from typing import Optional, Union

import torch
import torch.distributed as dist

Part = Union[slice, tuple]  # rows of dim 0, or (all rows, a slice of the columns)

# Block-relative parameter names -> how tensor parallelism splits them.
_COLUMN = re.compile(r"(attn1|attn2)\.(to_q|to_k|to_v|add_k_proj|add_v_proj)\.(weight|bias|row_scale)$"
                     r"|ffn\.net\.0\.proj\.(weight|bias|row_scale)$")
_NORM = re.compile(r"(attn1|attn2)\.(norm_q|norm_k|norm_added_k)\.weight$")
_ROW = re.compile(r"(attn1|attn2)\.to_out\.0\.weight$|ffn\.net\.2\.weight$")
_ROW_BIAS = re.compile(r"(attn1|attn2)\.to_out\.0\.bias$|ffn\.net\.2\.bias$")
_BLOCK = re.compile(r"(blocks|vace_blocks)\.(\d+)\.(.*)$")


def split_range(n: int, parts: int, index: int) -> slice:
    """`index`'s part of `range(n)` split in `parts` contiguous runs whose lengths differ by at most
    one (the first runs are the longer ones)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))


def tp_kind(name: str) -> Optional[str]:
    """How tensor parallelism splits parameter `name` (diffusers name): "column" (rows of the weight,
    the bias, an fp8-matmul Linear's per-row scale `row_scale`, a q/k norm's weight), "row" (columns
    of the weight; its `row_scale` stays whole: each rank quantises its own columns), "row_bias"
    (held whole by tensor rank 0 only) or None (replicated)."""
    m = _BLOCK.match(name)
    if not m:
        return None
    rest = m.group(3)
    if _COLUMN.search(rest) or _NORM.search(rest):
        return "column"
    if _ROW.search(rest):
        return "row"
    if _ROW_BIAS.search(rest):
        return "row_bias"
    return None


def tp_part(name: str, shape: tuple, tensor: int, rank: int) -> Optional[Part]:
    """The part of parameter `name` (of full `shape`) that tensor rank `rank` of `tensor` holds:
    None for all of it; raises nothing for "row_bias" (see `held_by`)."""
    if tensor == 1:
        return None
    kind = tp_kind(name)
    if kind == "column":
        return split_range(shape[0], tensor, rank)
    if kind == "row":
        return (slice(None), split_range(shape[1], tensor, rank))
    return None


def stage_blocks(num_layers: int, pipeline: int, stage: int) -> range:
    """The blocks pipeline stage `stage` of `pipeline` holds and runs."""
    part = split_range(num_layers, pipeline, stage)
    return range(part.start, part.stop)


def held_by(name: str, num_layers: int, tensor: int, pipeline: int, tp_rank: int, stage: int) -> bool:
    """Whether the rank at (`stage`, `tp_rank`) holds any of parameter `name`."""
    if tensor > 1 and tp_rank != 0 and tp_kind(name) == "row_bias":
        return False
    if pipeline == 1:
        return True
    top = name.split(".")[0]
    m = _BLOCK.match(name)
    if top == "blocks":
        return int(m.group(2)) in stage_blocks(num_layers, pipeline, stage)
    if top in ("vace_blocks", "vace_patch_embedding", "patch_embedding"):
        return stage == 0
    if top in ("proj_out", "norm_out", "scale_shift_table"):
        return stage == pipeline - 1
    return True  # the condition embedder, on every stage


def part_shape(shape: tuple, part: Optional[Part]) -> tuple:
    """The shape of `part` of a tensor of `shape`."""
    index = () if part is None else (part if isinstance(part, tuple) else (part,))
    return tuple(len(range(size)[index[i]]) if i < len(index) else size for i, size in enumerate(shape))


class TensorParallelRMSNorm(torch.nn.RMSNorm):
    """diffusers' `RMSNorm(heads * head_dim)` over all heads, of which this rank holds `heads /
    tensor`: the sum of squares (fp32) of the local part is all-reduced over the tensor ranks, so
    each rank divides by the global mean of squares of the whole row; its weight is this rank's
    slice. The arithmetic of `torch.nn.functional.rms_norm` (fp32 inside, the input's dtype out)."""

    tp_pg: Optional[dist.ProcessGroup]
    full_dim: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sum_sq = xf.pow(2).sum(-1, keepdim=True)
        dist.all_reduce(sum_sq, group=self.tp_pg)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        out = xf * torch.rsqrt(sum_sq / self.full_dim + eps)
        if self.weight is not None:
            out = out * self.weight
        return out.type_as(x)


_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def gather_tokens(x: torch.Tensor, pg: Optional[dist.ProcessGroup], tensor: int) -> torch.Tensor:
    """[B, n, ...] on each tensor rank -> [B, tensor * n, ...] on every one: the ranks' runs of
    tokens in rank (= sequence) order. One all-gather; no copy after it for B = 1."""
    x = x.contiguous()
    out = x.new_empty((tensor * x.shape[0], *x.shape[1:]))  # the ranks' tensors one after another along dim 0
    _ALL_GATHER(out, x, group=pg)
    out = out.view(tensor, *x.shape)
    if x.shape[0] == 1:
        return out.view(1, tensor * x.shape[1], *x.shape[2:])
    return out.transpose(0, 1).reshape(x.shape[0], tensor * x.shape[1], *x.shape[2:])


def reduce_scatter_tokens(y: torch.Tensor, pg: Optional[dist.ProcessGroup], tensor: int) -> torch.Tensor:
    """`gather_tokens`' layout of partial sums, [B, tensor * n, ...] -> this rank's run of the
    sum over the tensor ranks, [B, n, ...]."""
    parts = y.unflatten(1, (tensor, -1)).transpose(0, 1).contiguous()  # [tensor, B, n, ...]
    out = y.new_empty(parts.shape[1:])
    _REDUCE_SCATTER(out, parts.flatten(0, 1), group=pg)  # rank t's part: rows [t * B, (t + 1) * B)
    return out


def rank_rows(t: torch.Tensor, rows: slice, tokens: slice, tensor: int) -> torch.Tensor:
    """A piece (`rows`, `tokens` of the shard) of a gathered [B, tensor * n, ...] tensor: those
    tokens of every rank's run, in `gather_tokens`' layout."""
    if tensor == 1 or tokens == slice(None):
        return t[rows, tokens]
    return t[rows].unflatten(1, (tensor, -1))[:, :, tokens].flatten(1, 2)


def gather_input(module: torch.nn.Module, args):
    """Forward pre-hook of a column-parallel Linear whose input is the normed shard (cross-attention's
    q, the FFN's first Linear): the input of every tensor rank, gathered."""
    return (gather_tokens(args[0], module._xdit_tp_pg, module._xdit_tp),) + tuple(args[1:])


def reduce_scatter_output(module: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a row-parallel Linear: the partial products of every tensor rank's columns
    (the bias counted once, by rank 0), summed and scattered back to this rank's run of tokens."""
    return reduce_scatter_tokens(output, module._xdit_tp_pg, module._xdit_tp)
