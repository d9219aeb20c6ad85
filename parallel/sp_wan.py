"""Sequence-parallel forward of diffusers' `WanTransformer3DModel` / `WanVACETransformer3DModel`.

The weights and every sub-module are diffusers' own; this module changes only the data flow:

  patch-embed (full) -> flatten -> pad to a multiple of sp × tensor -> keep this rank's token shard
  (with its RoPE frequencies and, for per-token timesteps, its modulation) -> blocks with USP
  self-attention (cross-attention is local: every query sees the whole text/CLIP context)
  -> output head on the shard -> gather on the group leader -> unpad -> unpatchify.

With tensor parallelism the sequence group's shard is split once more, into one run of tokens per
tensor rank (Megatron's sequence parallelism; model_parallel.py): the stream, norms, modulation,
residuals, VACE hints and the head are on that run; the one seam is here, where self-attention
gathers the normed run of every tensor rank (`USPSelfAttnProcessor.attend`) and the block takes
each piece's tokens of every rank from the gathered attention output (`mp.rank_rows`); the gather
before cross-attention's q and the FFN and the reduce-scatter after each row-parallel Linear are
hooks on those Linears (runner.TensorPipeline). RoPE tables stay the sequence group's shard: they
go with the gathered tokens.

Every per-token operation (norms, modulation, FFN, cross-attention) is unaffected by sharding,
and padded keys are excluded from self-attention, so the result equals the single-process
forward up to floating-point reassociation, for any number of ranks.
"""
from __future__ import annotations

import math
import os
import types
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

from . import model_parallel as mp
from .attention import AttentionBackend, SPGroup, usp_attention_consuming
from .protocol import ROPE_OPTIONS, ForwardInputs
from .sp_audio import AudioPatch, AudioStep


@dataclass
class _StepContext:
    """What the attention processors need to know about the current forward."""

    group: Optional[SPGroup] = None
    backend: Optional[AttentionBackend] = None
    stages: Optional["Stages"] = None
    valid_len: int = 0
    image_context_len: int = 0
    audio: Optional[AudioStep] = None  # an audio patch (InfiniteTalk) in this forward


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Same arithmetic as diffusers' WanAttnProcessor (interleaved pairs).
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class USPSelfAttnProcessor:
    """attn1 of every Wan block: projections + qk-norm + RoPE on the local shard, USP attention.

    The per-token work (projection, RMSNorm across heads, RoPE: fp32 temporaries of the whole
    shard in diffusers' processor) is done in pieces of tokens, written into q and k; the all-to-all
    then consumes q, k, v one at a time (attention.usp_attention_consuming)."""

    def __init__(self, ctx: _StepContext):
        self.ctx = ctx

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return attn.to_out[1](attn.to_out[0](self.attend(attn, hidden_states, rotary_emb)))

    def attend(self, attn, hidden_states, rotary_emb):
        """The attention output before the output projection, [B, S, heads * head_dim] (the block
        projects it piece by piece with its gated residual: _block_forward)."""
        stages, group = self.ctx.stages, self.ctx.group
        if group.tensor > 1:  # the normed run of tokens of every tensor rank: this rank's heads of all of them
            hidden_states = mp.gather_tokens(hidden_states, group.tp_pg, group.tensor)

        def projected(linear, norm):
            def piece(h, rows, tokens):
                if rotary_emb is None:
                    return stages.project(linear, norm, h, attn.heads)
                cos, sin = rotary_emb  # [1, S, 1, D]: one table for every sample
                return stages.project_rope(linear, norm, h, attn.heads, cos[:, tokens], sin[:, tokens])
            return _by_pieces(hidden_states, piece)

        qkv = [projected(attn.to_q, attn.norm_q), projected(attn.to_k, attn.norm_k),
               attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))]
        dtype, head_dim = qkv[0].dtype, qkv[0].shape[-1]
        ctx = self.ctx
        if ctx.audio is not None and ctx.audio.masks is not None:  # two speakers: the map from this q and k
            ctx.audio.take_map(qkv[0], qkv[1], ctx.group)
        out = usp_attention_consuming(qkv, ctx.group, ctx.backend, ctx.valid_len, 1.0 / math.sqrt(head_dim))
        return out.flatten(2, 3).to(dtype)


class CrossAttnProcessor:
    """attn2: local cross-attention to text (+ CLIP image) context.

    Unlike diffusers' processor it splits image and text context by the image token count it was
    given, not by assuming 512 text tokens. Each query token attends to the context on its own, so
    the queries are processed in pieces of tokens (k and v once): the whole shard's fp32 RMSNorm
    temporaries never exist at once.
    """

    def __init__(self, ctx: _StepContext):
        self.ctx = ctx

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        attend = self._attention(attn, encoder_hidden_states)
        stages = self.ctx.stages

        def piece(h, rows, tokens):
            q = stages.project(attn.to_q, attn.norm_q, h, attn.heads)
            return attn.to_out[1](attn.to_out[0](attend(q, rows)))

        return _by_pieces(hidden_states, piece)

    def residual(self, attn, norm, hidden_states, encoder_hidden_states):
        """hidden_states + attn(norm(hidden_states)), piece by piece, written into hidden_states (the
        block's own tensor): the normed input and the attention output exist one piece at a time."""
        attend = self._attention(attn, encoder_hidden_states)
        stages = self.ctx.stages

        def piece(h, rows, tokens):
            q = stages.norm_project(norm, attn.to_q, attn.norm_q, h, attn.heads)
            return stages.add_projected(attn.to_out[0], h, attend(q, rows))

        return _per_token(hidden_states, piece, out=hidden_states)

    def _attention(self, attn, encoder_hidden_states):
        """q [rows, n, heads, head_dim] -> its attention to the text (+ image) context, [rows, n, dim];
        the context's k and v are projected once."""
        n_img = self.ctx.image_context_len if attn.add_k_proj is not None else 0
        img_ctx, txt_ctx = encoder_hidden_states[:, :n_img], encoder_hidden_states[:, n_img:]
        backend = self.ctx.backend
        k = attn.norm_k(attn.to_k(txt_ctx)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(txt_ctx).unflatten(2, (attn.heads, -1))
        scale = 1.0 / math.sqrt(k.shape[-1])
        if n_img:
            k_img = attn.norm_added_k(attn.add_k_proj(img_ctx)).unflatten(2, (attn.heads, -1))
            v_img = attn.add_v_proj(img_ctx).unflatten(2, (attn.heads, -1))

        def attend(q, rows):
            out = backend.plain(q, k[rows], v[rows], scale).flatten(2, 3).type_as(q)
            if n_img:
                out = out + backend.plain(q, k_img[rows], v_img[rows], scale).flatten(2, 3).type_as(q)
            return out

        return attend


def _rope(rope, hidden_states: torch.Tensor, options: Optional[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' RoPE tables (`WanRotaryPosEmbed`) for the latent's grid; with `options` (ComfyUI's
    rope_options, ScaleROPE) position k of an axis becomes shift + k * scale, as in native Wan's
    rope_encode, computed the way diffusers computes its table (float64 frequencies, fp32 cos/sin)."""
    if not options:
        return rope(hidden_states)
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    _, _, frames, height, width = hidden_states.shape
    p_t, p_h, p_w = rope.patch_size
    grid = (frames // p_t, height // p_h, width // p_w)
    cos, sin = [], []
    for axis, dim, steps in zip("tyx", (rope.t_dim, rope.h_dim, rope.w_dim), grid):
        shift, scale = (options.get(k, ROPE_OPTIONS[k]) for k in (f"shift_{axis}", f"scale_{axis}"))
        pos = shift + torch.arange(steps, dtype=torch.float64) * scale
        c, s = get_1d_rotary_pos_embed(dim, pos, use_real=True, repeat_interleave_real=True, freqs_dtype=torch.float64)
        view = [1, 1, 1, -1]
        view["tyx".index(axis)] = steps
        cos.append(c.view(view).expand(*grid, -1))
        sin.append(s.view(view).expand(*grid, -1))
    device = rope.freqs_cos.device
    cos = torch.cat(cos, dim=-1).reshape(1, math.prod(grid), 1, -1).to(device)
    sin = torch.cat(sin, dim=-1).reshape(1, math.prod(grid), 1, -1).to(device)
    return cos, sin


def _pad_and_shard(t: torch.Tensor, dim: int, padded: int, group: SPGroup, tensor: bool = True) -> torch.Tensor:
    """Pad `t` along `dim` to `padded` (zeros, a multiple of sp × tensor) and return this rank's
    contiguous shard: its sequence group's shard, and of that its tensor rank's run (`tensor`, the
    stream's split) or all of it (`tensor=False`: what self-attention's gathered tokens need)."""
    n = t.shape[dim]
    if padded != n:
        shape = list(t.shape)
        shape[dim] = padded - n
        t = torch.cat([t, t.new_zeros(shape)], dim=dim)
    t = t.chunk(group.sp, dim=dim)[group.sp_rank]
    if tensor and group.tensor > 1:
        t = t.chunk(group.tensor, dim=dim)[group.tp_rank]
    return t.contiguous()


class SequenceParallelWan(torch.nn.Module):
    """Runs a diffusers Wan transformer (T2V/I2V/FLF2V/TI2V-5B, or VACE) with USP.

    A module around the diffusers model (`self.model`), so that a placement can treat the whole
    forward as one root module: FSDP gathers the parameters the forward uses outside any block
    (patch embedding, output head, modulation table) in this module's pre-forward hook."""

    def __init__(self, model: torch.nn.Module, backend: AttentionBackend):
        super().__init__()
        self.model = model
        self.backend = backend
        self.ctx = _StepContext(backend=backend)
        self.is_vace = hasattr(model, "vace_blocks")
        self.pipeline_blocks = range(len(model.blocks))  # the blocks this rank runs (runner.TensorPipeline sets a stage's)
        self.stream_tokens = 0  # the last forward's tokens a row on this rank between blocks
        blocks = list(model.blocks) + (list(model.vace_blocks) if self.is_vace else [])
        for block in blocks:
            block.attn1.set_processor(USPSelfAttnProcessor(self.ctx))
            block.attn2.set_processor(CrossAttnProcessor(self.ctx))
            if type(block) is WanTransformerBlock:
                block.forward = types.MethodType(_block_forward, block)
                block._xdit_ctx = self.ctx
        for i, block in enumerate(model.blocks):
            block._xdit_index = i  # the audio patch's weights are per block

    @torch.no_grad()
    def forward(self, group: SPGroup, inputs: ForwardInputs, uni3c=None,
                audio: Optional[AudioPatch] = None) -> Optional[torch.Tensor]:
        """The rows `inputs` holds, on this rank's device (timestep may also be per frame, [B, frames]).
        `uni3c`: a `uni3c.Uni3CCall` when Uni3C camera control is on for this forward.
        `audio`: the weights of the audio patch inputs.audio_key names (sp_audio), when it names one.

        Returns the full output on the group leader and None on the other ranks.
        """
        hidden_states, timestep, encoder_hidden_states = inputs.hidden_states, inputs.timestep, inputs.encoder_hidden_states
        encoder_hidden_states_image = inputs.encoder_hidden_states_image
        control_hidden_states, control_hidden_states_scale = inputs.control_hidden_states, inputs.control_hidden_states_scale
        m = self.model
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = m.config.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)
        seq = math.prod(grid)
        split = group.sp * group.tensor  # the stream's shards: sequence ranks × tensor ranks
        padded = -(-seq // split) * split

        cos, sin = _rope(m.rope, hidden_states, inputs.rope_options)  # [1, S, 1, D] each
        cos, sin = (_pad_and_shard(t, 1, padded, group, tensor=False) for t in (cos, sin))

        first, last = group.stage == 0, group.stage == group.pipeline - 1
        x = None
        if first:
            x = m.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
            x = _pad_and_shard(x, 1, padded, group)

        embedder = m.condition_embedder.image_embedder
        if encoder_hidden_states_image is not None and embedder is not None and embedder.pos_embed is not None:
            # FLF2V: callers send both images' tokens as one [B, 2*257, dim] (ComfyUI's layout);
            # diffusers' image embedder wants them stacked as [2B, 257, dim].
            img = encoder_hidden_states_image
            encoder_hidden_states_image = img.reshape(img.shape[0] * 2, img.shape[1] // 2, img.shape[2])

        per_token = timestep.ndim == 2
        if per_token:
            if timestep.shape[1] == grid[0] and grid[0] != seq:  # per latent frame -> per token
                timestep = timestep.repeat_interleave(grid[1] * grid[2], dim=1)
            if timestep.shape[1] != seq:
                raise ValueError(f"timestep has {timestep.shape[1]} entries per sample; expected {grid[0]} or {seq}")
            timestep = _pad_and_shard(timestep, 1, padded, group)
        # every pipeline stage embeds the timestep and the context itself (cheap, and nothing to wait for)
        temb, timestep_proj, context, image_context = m.condition_embedder(
            timestep.flatten() if per_token else timestep,
            encoder_hidden_states,
            encoder_hidden_states_image,
            timestep_seq_len=timestep.shape[1] if per_token else None,
        )
        timestep_proj = timestep_proj.unflatten(2 if per_token else 1, (6, -1))
        n_img = 0
        if image_context is not None:
            n_img = image_context.shape[1]
            context = torch.cat([image_context, context], dim=1)

        self.ctx.group, self.ctx.valid_len, self.ctx.image_context_len = group, seq, n_img
        self.ctx.stages = Stages.compiled() if inputs.compile else _EAGER
        self.ctx.audio = self._audio_step(inputs, audio, group, grid, padded)
        rotary = (cos, sin)

        # VACE hints, already multiplied by their scale, by the index of the block that adds them
        hints: dict[int, torch.Tensor] = {}
        if self.is_vace:
            if control_hidden_states is None:
                raise ValueError("this is a VACE model: control_hidden_states (vace_context) is required")
            if first:
                c = m.vace_patch_embedding(control_hidden_states).flatten(2).transpose(1, 2)
                if c.shape[1] < seq:  # diffusers zero-pads short control sequences
                    c = torch.cat([c, c.new_zeros(batch, seq - c.shape[1], c.shape[2])], dim=1)
                c = _pad_and_shard(c, 1, padded, group)
                scales = control_hidden_states_scale
                if scales is None:
                    scales = c.new_ones(len(m.config.vace_layers))
                scales = torch.as_tensor(scales, device=c.device).flatten()
                if scales.numel() == 1:
                    scales = scales.expand(len(m.config.vace_layers))
                for i, block in enumerate(m.vace_blocks):
                    hint, c = block(x, context, c, timestep_proj, rotary)
                    hints[m.config.vace_layers[i]] = hint * scales[i]
        elif control_hidden_states is not None:
            raise ValueError("control_hidden_states (vace_context) given, but this is not a VACE model")

        control = None
        if uni3c is not None:  # Uni3C: its tokens padded and sharded as the video's (parallel/uni3c.py)
            from .uni3c import Uni3CRun, time_embedding

            control = Uni3CRun(uni3c, time_embedding(m, uni3c.timestep, encoder_hidden_states), group, self.backend,
                               padded, seq)

        skip = set(inputs.skip_blocks or ())
        if group.pipeline == 1:
            x = self._head(self._blocks(x, context, timestep_proj, rotary, hints, skip, control), temb)
        else:
            x = self._pipeline(group, x, context, timestep_proj, temb, rotary, hints, skip,
                               (batch, padded // split, m.config.num_attention_heads * m.config.attention_head_dim),
                               inputs.hidden_states.dtype)
        if not last:
            return None
        x = _gather_tensor_runs(x, group)  # the sequence group's shard, on tensor rank 0
        if x is None:
            return None
        x = _gather_to_leader(x, group)
        if x is None:
            return None
        x = x[:, :seq]
        x = x.reshape(batch, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _audio_step(self, inputs: ForwardInputs, audio: Optional[AudioPatch], group: SPGroup, grid: tuple,
                    padded: int) -> Optional[AudioStep]:
        if inputs.audio_key is None:
            return None
        if audio is None or audio.key != inputs.audio_key:
            raise KeyError(f"audio patch {inputs.audio_key!r} is not loaded on this rank")
        tokens = inputs.audio_tokens
        if tokens is None or tokens.ndim != 3 or tokens.shape[0] != grid[0]:
            raise ValueError(f"audio tokens must be [{grid[0]} latent frames, tokens, dim], got "
                             f"{None if tokens is None else tuple(tokens.shape)}")
        if self.is_vace or group.tensor > 1 or group.pipeline > 1:
            raise ValueError("the audio patch runs with the sequence layouts (Ulysses, ring, CFG split) and fsdp, "
                             "not with VACE, tensor or pipeline parallelism")
        masks = inputs.audio_ref_masks
        if masks is not None and (masks.ndim != 2 or masks.shape[0] != 2 or masks.shape[1] > math.prod(grid)):
            raise ValueError(f"audio speaker masks must be [2, reference tokens], got {tuple(masks.shape)}")
        return AudioStep(audio, tokens, float(inputs.audio_scale), start=group.sp_rank * (padded // group.sp),
                         valid=math.prod(grid), frame_tokens=grid[1] * grid[2], masks=masks)

    def _blocks(self, x, context, timestep_proj, rotary, hints, skip, control=None) -> torch.Tensor:
        """This rank's blocks (all of them, or its pipeline stage's) on the stream `x`; after each
        block, as native Wan runs its double_block patches, Uni3C's residual (`control`), then the
        VACE hint."""
        self.stream_tokens = x.shape[1]  # tokens a row of the stream between blocks holds on this rank
        for i in self.pipeline_blocks:
            if i not in skip:  # a skipped block passes the stream on unchanged; its VACE hint is still added
                x = self.model.blocks[i](x, context, timestep_proj, rotary)
            if control is not None:
                x = control.after_block(i, x)
            if i in hints:
                x = x + hints[i]
        return x

    def _head(self, x, temb) -> torch.Tensor:
        m = self.model
        if temb.ndim == 3:  # per-token (Wan 2.2 TI2V)
            shift, scale = (m.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (m.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (m.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        return m.proj_out(x)

    def _pipeline(self, group: SPGroup, x, context, timestep_proj, temb, rotary, hints, skip, shape, dtype):
        """GPipe over the batch rows: each row is a micro-batch that this stage receives from the
        previous stage (its token shard of the stream, plus the VACE hints later stages add), runs
        through its blocks and sends on without waiting (`isend`), so that stage s works on row b
        while stage s+1 works on row b-1. The last stage applies the output head to each row and
        returns the rows together, [batch, tokens, out]; the other stages return None.

        With tensor parallelism each tensor rank sends its own run of the stream to the same tensor
        rank of the next stage (`stage_stride` keeps the tensor rank), not a gathered copy: 1/tensor
        of the bytes a link, the tensor ranks' links in parallel, and no collective at the boundary
        (the next stage's first block starts with a norm on that run)."""
        first, last = group.stage == 0, group.stage == group.pipeline - 1
        rank = dist.get_rank()
        batch, tokens, dim = shape
        later = [i for i in sorted(self._vace_layers()) if i >= self.pipeline_blocks.stop]  # hints passed on
        arriving = [i for i in sorted(self._vace_layers()) if i >= self.pipeline_blocks.start]
        sent, outs = [], []
        for b in range(batch):
            row = slice(b, b + 1)
            if first:
                xb, hb = x[row], {i: h[row] for i, h in hints.items()}
            else:
                packet = torch.empty((1 + len(arriving), 1, tokens, dim), dtype=dtype, device=context.device)
                dist.recv(packet, src=rank - group.stage_stride)
                xb, hb = packet[0], dict(zip(arriving, packet[1:]))
            xb = self._blocks(xb, context[row], timestep_proj[row], rotary, hb, skip)
            if last:
                outs.append(self._head(xb, temb[row]))
            else:
                packet = torch.stack([xb] + [hb[i] for i in later]) if later else xb.unsqueeze(0).contiguous()
                sent.append((dist.isend(packet, dst=rank + group.stage_stride), packet))
        for work, _ in sent:
            work.wait()
        return torch.cat(outs) if last else None

    def _vace_layers(self) -> list[int]:
        return list(self.model.config.vace_layers) if self.is_vace else []


# A block's per-token work (norms, modulation, residuals, FFN, projections, RoPE, cross-attention
# queries) runs in pieces of token rows whose fp32 [rows, dim] temporary is at most this many bytes:
# 13,107 rows of the 14B model (dim 5120; FFN intermediate 346 MiB), 43,690 of the 1.3B (dim 1536),
# so a 480p sample of the 1.3B model is one piece and one 720p sample of the 14B six. See
# _block_forward. XDIT_USP_BLOCK_CHUNK_TOKENS sets the rows directly (the tests use tiny pieces).
PIECE_BYTES = 256 << 20
_PIECE_ROWS = int(os.environ.get("XDIT_USP_BLOCK_CHUNK_TOKENS", "0"))


def _pieces(batch: int, n: int, dim: int) -> list[tuple[slice, slice]]:
    """(samples, tokens) slices that cover a [batch, n, dim] activation in pieces of token rows, each
    a contiguous block of it (one sample's run of tokens), so that a Linear reads it without a copy.
    One piece, the whole tensor, when it is small enough."""
    step = _PIECE_ROWS or max(1, PIECE_BYTES // (4 * dim))
    if batch * n <= step:
        return [(slice(None), slice(None))]
    return [(slice(b, b + 1), slice(i, min(i + step, n))) for b in range(batch) for i in range(0, n, step)]


def _by_pieces(hidden: torch.Tensor, fn) -> torch.Tensor:
    """fn(hidden[rows, tokens], rows, tokens) for each piece, put together into one new tensor (fn's
    own result when there is one piece)."""
    pieces = _pieces(*hidden.shape)
    if len(pieces) == 1:
        return fn(hidden, *pieces[0])
    out = None
    for rows, tokens in pieces:
        t = fn(hidden[rows, tokens], rows, tokens)
        if out is None:
            out = t.new_empty((*hidden.shape[:2], *t.shape[2:]))
        out[rows, tokens] = t
    return out


def _per_token(hidden: torch.Tensor, fn, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fn(hidden[rows, tokens], rows, tokens) for each piece, in hidden's dtype: written into `out`
    (converted by the copy: the rounding `.type_as` does, without its intermediate tensor), or into
    a new tensor when `out` is None. `out` may be `hidden` itself: each piece is read whole before
    it is written."""
    pieces = _pieces(*hidden.shape)
    if out is None:
        if len(pieces) == 1:  # one piece: fn's result, converted once (what copying it into a new tensor costs)
            return fn(hidden, *pieces[0]).to(hidden.dtype)
        out = torch.empty_like(hidden)
    for rows, tokens in pieces:
        out[rows, tokens].copy_(fn(hidden[rows, tokens], rows, tokens))
    return out


def _at(mod: torch.Tensor, rows: slice, tokens: slice) -> torch.Tensor:
    """A modulation tensor's part for a piece: [B, 1, D] (one row for all tokens) or [B, S, D]
    (Wan 2.2 TI2V: one per token)."""
    return mod[rows] if mod.shape[1] == 1 else mod[rows, tokens]


# ---- the block's compute between communications --------------------------------------------------
def _modulated_norm(norm, h, scale, shift, dtype):
    out = norm(h.float()) * (1 + scale) + shift
    return out if dtype is None else out.to(dtype)


def _projected_residual(linear, h, a, gate, dtype):
    out = h.float() + linear(a) * gate
    return out if dtype is None else out.to(dtype)


def _norm_project(norm, linear, qnorm, h, heads):
    return qnorm(linear(norm(h.float()).to(h.dtype))).unflatten(2, (heads, -1))


def _add_projected(linear, h, a):
    return h + linear(a)


def _ffn_residual(norm3, ffn, h, scale, shift, gate, dtype):
    ff_output = ffn((norm3(h.float()) * (1 + scale) + shift).type_as(h))
    out = h.float() + ff_output.float() * gate
    return out if dtype is None else out.to(dtype)


def _project(linear, norm, h, heads):
    return norm(linear(h)).unflatten(2, (heads, -1))


def _project_rope(linear, norm, h, heads, cos, sin):
    return _apply_rotary(norm(linear(h)).unflatten(2, (heads, -1)), cos, sin)


@dataclass(frozen=True)
class Stages:
    """The per-token work of a transformer block, as functions of tensors and of the block's own
    modules: everything a block computes between communications and attention kernels (norms,
    modulation, projections with their gated residuals, the FFN, q/k projection + RMSNorm + RoPE).
    Eager, they are diffusers' operations; `compiled()` gives the same functions through
    `torch.compile` (regional compilation: one compiled graph per function, shared by every block,
    because parameters are graph inputs; the collectives and attention kernels stay outside, eager).

    With `cast`, a function returns its result already in the activation dtype (the rounding fused
    into the compiled kernel); eager, it returns fp32 and the caller's copy rounds it: the same bits."""

    modulated_norm: object
    projected_residual: object
    norm_project: object
    add_projected: object
    ffn_residual: object
    project: object
    project_rope: object
    cast: bool = False

    @classmethod
    def eager(cls) -> "Stages":
        return cls(*_STAGE_FNS)

    @classmethod
    def compiled(cls) -> "Stages":
        """Compiled once per process (module-level code objects, dynamic shapes: pieces, batch sizes
        and resolutions reuse the graphs); a LoRA's in-place weight update is seen, as parameters are
        inputs of the graph, not constants."""
        if not _COMPILED:
            # One graph serves every block, but a function is specialised for what is not a
            # dynamic size: head count, norm kind, per-token vs per-sample modulation (broadcast
            # from size 1), a 1-token piece, dtype. A model or two (Wan 2.2's experts) with batches
            # 1 and 2 and the short last piece can pass dynamo's default of 8 graphs per function,
            # which with fullgraph is an error, not a fallback; 64 is far above what one process meets.
            import torch._dynamo.config

            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            _COMPILED.extend(torch.compile(f, dynamic=True, fullgraph=True) for f in _STAGE_FNS)
        return cls(*_COMPILED, cast=True)

    def dtype(self, h: torch.Tensor) -> Optional[torch.dtype]:
        return h.dtype if self.cast else None


_STAGE_FNS = (_modulated_norm, _projected_residual, _norm_project, _add_projected, _ffn_residual, _project,
              _project_rope)
_COMPILED: list = []
_EAGER = Stages.eager()


def _block_forward(self: WanTransformerBlock, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   temb: torch.Tensor, rotary_emb) -> torch.Tensor:
    """diffusers' `WanTransformerBlock.forward`, the same operations in the same order, with its
    per-token work done in pieces of token rows instead of on the whole sequence at once, by the
    functions of the forward's `Stages` (eager or compiled).

    The block's peak memory is then set by attention (q, k, v and the all-to-all buffers), not by the
    fp32 temporaries of the norms, modulation and residuals (several [B, S, D] fp32 tensors at a
    time) nor the FFN's [B, S, ffn_dim] intermediate. Each token's result is computed by the same
    operations as diffusers'; only a matmul's kernel choice may differ with the number of rows
    (rounding-level, as any change of shape)."""
    st = self._xdit_ctx.stages
    dt = st.dtype(hidden_states)
    if temb.ndim == 4:  # [B, S, 6, D]: per-token modulation (Wan 2.2 TI2V)
        mods = (self.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)
        mods = [t.squeeze(2) for t in mods]
    else:  # [B, 6, D]
        mods = (self.scale_shift_table + temb.float()).chunk(6, dim=1)
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mods

    # 1. Self-attention; its output projection runs piece by piece with the gated residual
    norm = _per_token(hidden_states, lambda h, r, t: st.modulated_norm(
        self.norm1, h, _at(scale_msa, r, t), _at(shift_msa, r, t), dt))
    attn_output = self.attn1.processor.attend(self.attn1, norm, rotary_emb)
    del norm
    tp = self._xdit_ctx.group.tensor  # attn_output: every tensor rank's tokens (the gathered run)
    hidden_states = _per_token(hidden_states, lambda h, r, t, a=attn_output: st.projected_residual(
        self.attn1.to_out[0], h, mp.rank_rows(a, r, t, tp), _at(gate_msa, r, t), dt))
    del attn_output

    # 2. Cross-attention (norm, attention, projection and residual by pieces), in place: this tensor is ours
    hidden_states = self.attn2.processor.residual(self.attn2, self.norm2, hidden_states, encoder_hidden_states)
    audio = self._xdit_ctx.audio  # an audio patch (InfiniteTalk): ComfyUI's attn2_patch runs here
    if audio is not None:
        hidden_states = audio.residual(self._xdit_index, hidden_states)

    # 3. Feed-forward, in place: this tensor is ours
    return _per_token(hidden_states, lambda h, r, t: st.ffn_residual(
        self.norm3, self.ffn, h, _at(c_scale_msa, r, t), _at(c_shift_msa, r, t), _at(c_gate_msa, r, t), dt), out=hidden_states)


def _gather_tensor_runs(x: torch.Tensor, group: SPGroup) -> Optional[torch.Tensor]:
    """The tensor ranks' runs of the head's output, in sequence order, on tensor rank 0 (None on
    the others)."""
    if group.tensor == 1:
        return x
    x = x.contiguous()
    first = group.tp_rank == 0
    parts = [torch.empty_like(x) for _ in range(group.tensor)] if first else None
    dist.gather(x, parts, dst=dist.get_global_rank(group.tp_pg, 0), group=group.tp_pg)
    return torch.cat(parts, dim=1) if first else None


def _gather_to_leader(x: torch.Tensor, group: SPGroup) -> Optional[torch.Tensor]:
    if group.sp == 1:
        return x
    x = x.contiguous()
    leader = group.sp_ranks[0]
    parts = [torch.empty_like(x) for _ in range(group.sp)] if group.is_leader else None
    dist.gather(x, parts, dst=leader, group=group.sp_pg)
    return torch.cat(parts, dim=1) if group.is_leader else None
