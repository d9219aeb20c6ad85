"""Audio patch on sequence-sharded video tokens: InfiniteTalk / MultiTalk's per-block audio
cross-attention, single speaker (ComfyUI: comfy/ldm/wan/model_multitalk.py, `MultiTalkCrossAttnPatch`
with `SingleStreamAttention`, installed by WanInfiniteTalkToVideo as an attn2_patch).

After block i's cross-attention, every video token of latent frame f attends to frame f's audio
tokens (nothing else):

    x <- x + scale * proj(attention(q_linear(norm_x(x)), kv_linear(audio[f])))

per token, with the patch's own head count. A rank holds a contiguous range of the (padded)
frame-major token sequence, so it walks the frames its range meets (a range may begin or end inside
a frame) and attends each segment to its frame's audio tokens: no communication, and padded tokens
are left alone. The projected audio tokens come from the owner (ComfyUI's node projects the audio
features there, once per sampling); only the per-block weights live here.

Two speakers (MultiTalkGetAttnMapPatch + SingleStreamMultiAttention): in each block's self-attention,
every token's attention probabilities to the reference tokens (the first ones, the first frame's,
k after RMSNorm and RoPE) are summed inside each speaker's mask, averaged over heads (in two halves,
as ComfyUI's get_attn_map_with_target): a map [speaker, token]. The reference k rows live on the
first rank(s): one all-reduce (sum of zero-filled copies, exact) gives every rank all of them. The
map's per-speaker min and max over the whole sequence (one MAX all-reduce) scale it to 1-D RoPE
positions (speaker 1 in [0, 4], speaker 2 in [20, 24]; each token takes the speaker whose map is
larger), which rotate the audio attention's q; its k rotate at 2 (the first half of each frame's
audio tokens, speaker 1's) or 22 (the second half).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

# SingleStreamMultiAttention's constants: class_range 24, class_interval 4
_ROPE_H1, _ROPE_H2 = (0.0, 4.0), (20.0, 24.0)
MAP_PIECE_TOKENS = 4096  # query rows per piece of the speaker map (its logits: rows x reference tokens x heads)

_PARTS = ("norm_x.weight", "norm_x.bias",
          "audio_cross_attn.q_linear.weight", "audio_cross_attn.q_linear.bias",
          "audio_cross_attn.kv_linear.weight", "audio_cross_attn.kv_linear.bias",
          "audio_cross_attn.proj.weight", "audio_cross_attn.proj.bias")


class AudioPatch:
    """One rank's copy of an audio patch's per-block weights (protocol.AudioLoad), on its device."""

    def __init__(self, key: str, tensors: dict, num_heads: int, eps: float, device, dtype):
        self.key, self.num_heads, self.eps = key, int(num_heads), float(eps)
        self.blocks: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            head, _, rest = name.partition(".")
            index, _, part = rest.partition(".")
            if head != "blocks" or not index.isdigit() or part not in _PARTS:
                raise KeyError(f"unexpected audio patch tensor {name!r}; expected blocks.<i>.<{'|'.join(_PARTS)}>")
            self.blocks.setdefault(int(index), {})[part] = t.to(device, dtype=dtype, copy=True)
        for index, parts in self.blocks.items():
            missing = [p for p in _PARTS if p not in parts]
            if missing:
                raise KeyError(f"audio patch block {index} lacks {missing}")
            dim = parts["audio_cross_attn.q_linear.weight"].shape[0]
            if dim % self.num_heads:
                raise ValueError(f"audio attention of width {dim} cannot have {self.num_heads} heads")

    @property
    def param_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for parts in self.blocks.values() for t in parts.values())


@dataclass
class AudioStep:
    """One forward's audio: the patch, the frames' audio tokens [frames, tokens, audio dim], the
    scale, and where this rank's token range lies: its first token's global index `start`, the
    real (unpadded) token count `valid` and the tokens per latent frame."""

    patch: AudioPatch
    tokens: torch.Tensor
    scale: float
    start: int
    valid: int
    frame_tokens: int
    masks: Optional[torch.Tensor] = None  # [2 speakers, reference tokens]: two speakers
    positions: Optional[torch.Tensor] = None  # [B, L] this block's q RoPE positions (two speakers), from take_map

    def take_map(self, q: torch.Tensor, k: torch.Tensor, group):
        """Two speakers: this block's speaker map from self-attention's q, k [B, L, heads, head_dim]
        (this rank's tokens, after norm and RoPE), turned into the q positions of its audio attention."""
        b, length, heads, d = q.shape
        n_ref = self.masks.shape[1]
        ref = k.new_zeros(b, n_ref, heads, d)
        mine = max(0, min(self.start + length, n_ref) - self.start)
        if mine:
            ref[:, self.start:self.start + mine] = k[:, :mine]
        if group.sp > 1:
            dist.all_reduce(ref, group=group.sp_pg)
        masks = self.masks.to(q.dtype)
        half = heads // 2
        maps = q.new_zeros(2, b, length)
        ref = ref.permute(0, 2, 3, 1)  # [B, heads, D, n_ref]
        for lo in range(0, length, MAP_PIECE_TOKENS):
            hi = min(length, lo + MAP_PIECE_TOKENS)
            vq = q[:, lo:hi].transpose(1, 2) * (1.0 / d ** 0.5)  # [B, heads, rows, D]
            for i in range(2):  # ComfyUI's split_num: two halves of the heads, their means averaged
                att = vq[:, i * half:(i + 1) * half] @ ref[:, i * half:(i + 1) * half]
                att = (att - att.max(dim=-1, keepdim=True).values).exp()
                att = att / (att.sum(dim=-1, keepdim=True) + 1e-8)
                for c in range(2):
                    m = masks[c]
                    maps[c, :, lo:hi] += ((att * m).sum(-1) / (m.sum() + 1e-8)).mean(dim=1)
        maps = maps / 2
        nv = max(0, min(length, self.valid - self.start))  # real tokens: padding takes no part in min / max
        top = maps.new_full((2, b), float("-inf"))
        neg_low = maps.new_full((2, b), float("-inf"))
        if nv:
            top = maps[:, :, :nv].amax(-1)
            neg_low = (-maps[:, :, :nv]).amax(-1)
        bounds = torch.stack([top, neg_low])
        if group.sp > 1:
            dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=group.sp_pg)
        top, low = bounds[0], -bounds[1]  # [2, B]
        scaled = []
        for c, (r0, r1) in enumerate((_ROPE_H1, _ROPE_H2)):
            lo_c, hi_c = low[c][:, None], top[c][:, None]
            scaled.append((maps[c] - lo_c) / (hi_c - lo_c + 1e-8) * (r1 - r0) + r0)
        pick = maps.argmax(dim=0)  # [B, L]: the speaker whose map is larger (the first on a tie)
        self.positions = torch.where(pick == 0, scaled[0], scaled[1])

    def residual(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Block `index`'s audio residual added into `x` [B, L, dim] (this rank's tokens) in place."""
        w = self.patch.blocks.get(index)
        if w is None:
            raise KeyError(f"the audio patch has no weights for block {index} (it has {len(self.patch.blocks)} blocks)")
        if self.masks is not None and self.positions is None:
            raise RuntimeError(f"block {index}: two speakers but no speaker map was taken in its self-attention")
        lo, hi = self.start, min(self.start + x.shape[1], self.valid)
        t = lo
        while t < hi:
            f = t // self.frame_tokens
            end = min(hi, (f + 1) * self.frame_tokens)
            seg = x[:, t - lo:end - lo]
            pos = self.positions[:, t - lo:end - lo] if self.masks is not None else None
            x[:, t - lo:end - lo] = seg + self._attend(w, seg, self.tokens[f], pos) * self.scale
            t = end
        self.positions = None
        return x

    def _attend(self, w: dict, h: torch.Tensor, audio: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, dim = h.shape
        heads = self.patch.num_heads
        normed = F.layer_norm(h, (dim,), w["norm_x.weight"].to(h.dtype), w["norm_x.bias"].to(h.dtype), self.patch.eps)
        q = F.linear(normed, w["audio_cross_attn.q_linear.weight"].to(h.dtype), w["audio_cross_attn.q_linear.bias"].to(h.dtype))
        q = q.view(b, n, heads, dim // heads).transpose(1, 2)
        kv = F.linear(audio.to(h.dtype), w["audio_cross_attn.kv_linear.weight"].to(h.dtype),
                      w["audio_cross_attn.kv_linear.bias"].to(h.dtype))
        k, v = kv.view(audio.shape[0], 2, heads, dim // heads).unbind(1)
        k = k.transpose(0, 1).unsqueeze(0).expand(b, -1, -1, -1)
        v = v.transpose(0, 1).unsqueeze(0).expand(b, -1, -1, -1)
        if pos is not None:  # two speakers: 1-D RoPE, q at the token's speaker position, k at its speaker's centre
            n_a = audio.shape[0]
            kpos = torch.full((n_a,), (_ROPE_H2[0] + _ROPE_H2[1]) / 2, dtype=k.dtype, device=k.device)
            kpos[: n_a // 2] = (_ROPE_H1[0] + _ROPE_H1[1]) / 2
            q = _rope_1d(q, pos[:, None, :])
            k = _rope_1d(k, kpos[None, None, :].expand(b, 1, -1))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, dim)
        return F.linear(out, w["audio_cross_attn.proj.weight"].to(h.dtype), w["audio_cross_attn.proj.bias"].to(h.dtype))


def _rope_1d(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """ComfyUI's RotaryPositionalEmbedding1D on x [B, H, n, D] at positions pos [B, 1, n] (fp32,
    interleaved pairs: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin))."""
    d = x.shape[-1]
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    freqs = (pos.float()[..., None] * freqs.to(x.device)).repeat_interleave(2, dim=-1)  # [B, 1, n, D]
    cos, sin = freqs.cos(), freqs.sin()
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).type_as(x)
