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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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

    def residual(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Block `index`'s audio residual added into `x` [B, L, dim] (this rank's tokens) in place."""
        w = self.patch.blocks.get(index)
        if w is None:
            raise KeyError(f"the audio patch has no weights for block {index} (it has {len(self.patch.blocks)} blocks)")
        lo, hi = self.start, min(self.start + x.shape[1], self.valid)
        t = lo
        while t < hi:
            f = t // self.frame_tokens
            end = min(hi, (f + 1) * self.frame_tokens)
            seg = x[:, t - lo:end - lo]
            x[:, t - lo:end - lo] = seg + self._attend(w, seg, self.tokens[f]) * self.scale
            t = end
        return x

    def _attend(self, w: dict, h: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
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
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, dim)
        return F.linear(out, w["audio_cross_attn.proj.weight"].to(h.dtype), w["audio_cross_attn.proj.bias"].to(h.dtype))
