"""Uni3C camera control (https://github.com/ewrfcas/Uni3C) on the worker group: the control network
of ComfyUI's `comfy/ldm/wan/uni3c.py`, run sequence-parallel beside the Wan blocks.

ComfyUI's `WanUni3CCnetPatch` (a `double_block` patch) runs it as follows, and so does this module:

- before Wan block 0's patch call, the control input [n, 36, T, H, W] (the first 20 channels of the
  model input, zero-padded to 20, then the VAE-encoded render video: built in ComfyUI's process by
  the patch's own code) goes through the patch embedding (a 1x2x2 Conv3d, fp32), its own 3-axis
  RoPE table, and `proj_in`; `temb` is Wan's time embedding (native's `vec`, diffusers'
  `condition_embedder` `temb`: the time_embedder output, before `time_proj`) of the same rows;
- after Wan block i < num_layers, control block i runs and `proj_out[i](hidden) * strength` is
  added to the image tokens.

Its tokens are the video tokens' (t, h, w) grid (patch 1x2x2, as Wan 2.1's), so they are padded
and sharded exactly as the video tokens are, and the control blocks' self-attention is the USP
attention of the layout (Ulysses, ring, hybrid; padded keys excluded): the control heads (16 in the
released model) must divide by the Ulysses degree.

Why a module of our own rather than diffusers': the control block's norm is a LayerNormZero with an
affine LayerNorm (eps 1e-5) giving shift/scale/gate from `temb`, which has no diffusers Wan
counterpart, and its attention must run through our USP attention anyway. What does match exactly
is reused: diffusers' `WanRotaryPosEmbed` (the same t/h/w split of the head dim as ComfyUI's
EmbedND here, theta 10000, float64 frequencies) and sp_wan's RoPE arithmetic. Parameter names are
ComfyUI's (after ModelPatchLoader's conversion), so its state dict loads as is; the mask embedding,
which the node never feeds, is not built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# the state-dict prefixes this module does not hold: ComfyUI builds them but WanUni3CCnetPatch never
# uses them (process_input is called without render_mask / camera_embedding)
UNUSED_PREFIXES = ("controlnet_mask_embedding.",)


def config_from_state_dict(sd: dict) -> dict:
    """The constructor arguments of a Uni3C state dict with ComfyUI's key names (shapes only), as
    comfy_extras/nodes_model_patch.py's ModelPatchLoader derives them."""
    conv_out_dim = sd["controlnet_patch_embedding.weight"].shape[0]
    dim = sd["proj_in.weight"].shape[0] if "proj_in.weight" in sd else conv_out_dim
    return dict(
        in_channels=int(sd["controlnet_patch_embedding.weight"].shape[1]),
        conv_out_dim=int(conv_out_dim),
        dim=int(dim),
        ffn_dim=int(sd["controlnet_blocks.0.ffn.0.bias"].shape[0]),
        num_heads=16,  # not in the weights: ComfyUI always builds 16 heads (the released model has 16)
        num_layers=sum(1 for k in sd if k.startswith("proj_out.") and k.endswith(".weight")),
        time_embed_dim=int(sd["controlnet_blocks.0.norm1.linear.weight"].shape[1]),
        out_proj_dim=int(sd["proj_out.0.weight"].shape[0]),
    )


class LayerNormZero(nn.Module):
    """ComfyUI's Uni3CLayerNormZero: shift, scale, gate = Linear(SiLU(temb)); affine LayerNorm."""

    def __init__(self, conditioning_dim: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.linear = nn.Linear(conditioning_dim, 3 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)

    def forward(self, x, temb):
        shift, scale, gate = self.linear(nn.functional.silu(temb)).chunk(3, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :], gate[:, None, :]


class SelfAttention(nn.Module):
    """ComfyUI's WanSelfAttention (qk RMSNorm across heads, eps 1e-6), names q/k/v/o."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=eps, elementwise_affine=True)
        self.norm_k = nn.RMSNorm(dim, eps=eps, elementwise_affine=True)


class Block(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, num_heads: int, time_embed_dim: int):
        super().__init__()
        self.norm1 = LayerNormZero(time_embed_dim, dim)
        self.self_attn = SelfAttention(dim, num_heads)
        self.norm2 = LayerNormZero(time_embed_dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))


class Uni3CNet(nn.Module):
    """The Uni3C control network's weights (ComfyUI's names) and its RoPE table."""

    def __init__(self, in_channels=36, conv_out_dim=5120, dim=1024, ffn_dim=8192, num_heads=16, num_layers=20,
                 time_embed_dim=5120, out_proj_dim=5120):
        super().__init__()
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

        self.num_layers, self.num_heads = num_layers, num_heads
        self.controlnet_patch_embedding = nn.Conv3d(in_channels, conv_out_dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_in = nn.Linear(conv_out_dim, dim) if conv_out_dim != dim else nn.Identity()
        self.controlnet_blocks = nn.ModuleList(Block(dim, ffn_dim, num_heads, time_embed_dim) for _ in range(num_layers))
        self.proj_out = nn.ModuleList(nn.Linear(dim, out_proj_dim) for _ in range(num_layers))
        self.rope = WanRotaryPosEmbed(dim // num_heads, (1, 2, 2), 1024)

    @property
    def patch_size(self) -> tuple:
        return (1, 2, 2)


def build(config: dict, tensors: dict, device: torch.device, dtype: torch.dtype) -> Uni3CNet:
    """The net of `config` with `tensors` (ComfyUI's names; unused prefixes ignored) on `device`,
    in `dtype` except the patch embedding, which ComfyUI keeps in fp32."""
    net = Uni3CNet(**config)
    sd = {k: v for k, v in tensors.items() if not k.startswith(UNUSED_PREFIXES)}
    net.load_state_dict(sd, strict=True)
    for part in (net.proj_in, net.controlnet_blocks, net.proj_out):  # not the fp32 patch embedding nor the RoPE tables
        part.to(dtype)
    net.to(device)
    net.requires_grad_(False)
    return net


@dataclass
class Uni3CCall:
    """One forward's Uni3C work on one rank: the net, the control input of the distinct rows this
    rank's CFG group needs ([n, C, T, H, W], compute dtype), their timesteps ([n] or [n, frames]),
    for each row of the group the index of its control row, and the strength."""

    net: Uni3CNet
    control: torch.Tensor
    timestep: torch.Tensor
    index: torch.Tensor
    strength: float


class Uni3CRun:
    """The state of the control branch during one forward on one rank (sp_wan calls `after_block`
    after each Wan block)."""

    def __init__(self, call: Uni3CCall, temb: torch.Tensor, group, backend, padded: int, seq: int):
        from .sp_wan import _pad_and_shard

        net = call.net
        if group.pipeline > 1 or group.tensor > 1:
            raise ValueError("Uni3C (WanUni3CControlnetApply) is not supported with pipeline_parallel_degree or "
                             "tensor_parallel_degree > 1; use the sequence layouts (Ulysses, ring, CFG split) with "
                             "replicated or fsdp weights")
        if net.num_heads % group.ulysses:
            raise ValueError(f"Uni3C's control network has {net.num_heads} heads, which the Ulysses degree "
                             f"{group.ulysses} does not divide; use a Ulysses degree dividing {net.num_heads} "
                             "(ring takes the rest)")
        self.net, self.call, self.group, self.backend, self.seq = net, call, group, backend, seq
        control = call.control
        hidden = net.controlnet_patch_embedding(control.float()).to(control.dtype)
        if hidden.shape[2:].numel() != seq:
            raise ValueError(f"Uni3C control input {tuple(control.shape[2:])} does not give the video's {seq} tokens")
        cos, sin = net.rope(control)  # [1, S, 1, D]: the same table ComfyUI's EmbedND gives
        hidden = _pad_and_shard(hidden.flatten(2).transpose(1, 2), 1, padded, group)
        self.cos, self.sin = _pad_and_shard(cos, 1, padded, group), _pad_and_shard(sin, 1, padded, group)
        self.hidden = net.proj_in(hidden)
        self.temb = temb.to(hidden.dtype)

    def after_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """x after Wan block i, plus control block i's residual (x unchanged past the last one)."""
        if i >= self.net.num_layers:
            return x
        self.hidden = self._block(self.net.controlnet_blocks[i], self.hidden)
        residual = self.net.proj_out[i](self.hidden).to(x.dtype) * self.call.strength
        x += residual[self.call.index]
        if i == self.net.num_layers - 1:
            self.hidden = None
        return x

    def _block(self, block: Block, h: torch.Tensor) -> torch.Tensor:
        from .attention import usp_attention_consuming
        from .sp_wan import _apply_rotary

        attn = block.self_attn
        norm_x, gate = block.norm1(h, self.temb)
        heads = attn.num_heads
        q = _apply_rotary(attn.norm_q(attn.q(norm_x)).unflatten(2, (heads, -1)), self.cos, self.sin)
        k = _apply_rotary(attn.norm_k(attn.k(norm_x)).unflatten(2, (heads, -1)), self.cos, self.sin)
        v = attn.v(norm_x).unflatten(2, (heads, -1))
        del norm_x
        head_dim = q.shape[-1]
        out = usp_attention_consuming([q, k, v], self.group, self.backend, self.seq, 1.0 / math.sqrt(head_dim))
        h = h + gate * attn.o(out.flatten(2, 3).to(h.dtype))
        norm_x, gate = block.norm2(h, self.temb)
        return h + gate * block.ffn(norm_x)


def time_embedding(model, timestep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Native's `vec` rows for the control net: Wan's time embedding (diffusers' `temb`) of `timestep`
    ([n], or [n, k] per frame / token: the first, as WanUni3CCnetPatch takes vec[:, 0]). Through the
    whole condition embedder (one text token per row, discarded), so a sharded placement gathers its
    weights as it does for the main forward."""
    if timestep.ndim == 2:
        timestep = timestep[:, 0]
    ctx = like[:1, :1].expand(timestep.shape[0], -1, -1)
    temb, *_ = model.condition_embedder(timestep, ctx, None)
    return temb
