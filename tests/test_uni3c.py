"""Uni3C camera control on the worker group (parallel/uni3c.py): real torchrun + gloo groups on CPU,
fp32, a tiny Wan model and a tiny random Uni3C net, against a single-process reference written here
from ComfyUI's comfy/ldm/wan/uni3c.py and WanUni3CCnetPatch (not from our runtime): the control
net runs on the first cond's rows, its residual proj_out[i](hidden) * strength is added after
Wan block i, repeated over the other conds' rows.

Two launches: Ulysses 2 (replicated weights), and CFG split 2 with fsdp, whose batch-1 calls take
the ring-2 fallback layout; a padded token count (45 tokens on 2 ranks) in both.
"""
from __future__ import annotations

import math

import torch

from comfyui_xdit_usp.parallel import WorkerGroup, XDitUSPConfig, tiny
from comfyui_xdit_usp.parallel.protocol import ForwardInputs
from comfyui_xdit_usp.parallel.tiny import rel_err

TOL = 1e-5
HEADS, DIM, CONV_OUT, FFN, LAYERS = 16, 192, 96, 64, 2  # head dim 12: RoPE axes 4 + 4 + 4


def uni3c_state_dict(model_dim: int, seed: int = 3) -> dict:
    """A tiny random Uni3C net under ComfyUI's names (after ModelPatchLoader's key conversion),
    mask embedding included (ComfyUI builds it; the patch never uses it)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    sd = {"controlnet_patch_embedding.weight": r(CONV_OUT, 36, 1, 2, 2), "controlnet_patch_embedding.bias": r(CONV_OUT),
          "proj_in.weight": r(DIM, CONV_OUT), "proj_in.bias": r(DIM),
          "controlnet_mask_embedding.mask_proj.0.weight": r(8, 7, 4, 8, 8)}
    for i in range(LAYERS):
        b = f"controlnet_blocks.{i}."
        for n in ("norm1", "norm2"):
            sd.update({b + n + ".linear.weight": r(3 * DIM, model_dim), b + n + ".linear.bias": r(3 * DIM),
                       b + n + ".norm.weight": 1 + r(DIM), b + n + ".norm.bias": r(DIM)})
        for n in "qkvo":
            sd.update({b + f"self_attn.{n}.weight": r(DIM, DIM), b + f"self_attn.{n}.bias": r(DIM)})
        sd.update({b + "self_attn.norm_q.weight": 1 + r(DIM), b + "self_attn.norm_k.weight": 1 + r(DIM),
                   b + "ffn.0.weight": r(FFN, DIM), b + "ffn.0.bias": r(FFN),
                   b + "ffn.2.weight": r(DIM, FFN), b + "ffn.2.bias": r(DIM),
                   f"proj_out.{i}.weight": r(model_dim, DIM), f"proj_out.{i}.bias": r(model_dim)})
    return sd


def _rope(grid, head_dim):
    """ComfyUI's EmbedND for Uni3C as complex rotations, [S, head_dim / 2]."""
    d6 = head_dim // 6
    angles = []
    for axis, dim in enumerate((head_dim - 4 * d6, 2 * d6, 2 * d6)):
        omega = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        pos = torch.arange(grid[axis], dtype=torch.float64)
        shape = [1, 1, 1, -1]
        shape[axis] = grid[axis]
        angles.append((pos[:, None] * omega[None]).reshape(shape).expand(*grid, -1))
    a = torch.cat(angles, dim=-1).reshape(math.prod(grid), -1)
    return torch.polar(torch.ones_like(a), a).to(torch.complex64)


def _rotate(x, rot):  # x [B, S, H, D], interleaved pairs
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * rot[None, :, None]).flatten(-2)


def control_residuals(sd, control, temb, strength):
    """uni3c.py's process_input + forward_block for each layer: the residuals [n, S, model_dim]."""
    f = torch.nn.functional
    h = f.conv3d(control.float(), sd["controlnet_patch_embedding.weight"], sd["controlnet_patch_embedding.bias"],
                 stride=(1, 2, 2))
    grid = tuple(h.shape[2:])
    h = f.linear(h.flatten(2).transpose(1, 2), sd["proj_in.weight"], sd["proj_in.bias"])
    rot = _rope(grid, DIM // HEADS)
    out = []
    for i in range(LAYERS):
        b = f"controlnet_blocks.{i}."

        def nz(x, n):
            shift, scale, gate = f.linear(f.silu(temb), sd[b + n + ".linear.weight"], sd[b + n + ".linear.bias"]).chunk(3, 1)
            x = f.layer_norm(x, (DIM,), sd[b + n + ".norm.weight"], sd[b + n + ".norm.bias"], eps=1e-5)
            return x * (1 + scale[:, None]) + shift[:, None], gate[:, None]

        def lin(x, n):
            return f.linear(x, sd[b + f"self_attn.{n}.weight"], sd[b + f"self_attn.{n}.bias"])

        x, gate = nz(h, "norm1")
        q = f.rms_norm(lin(x, "q"), (DIM,), sd[b + "self_attn.norm_q.weight"], eps=1e-6).unflatten(2, (HEADS, -1))
        k = f.rms_norm(lin(x, "k"), (DIM,), sd[b + "self_attn.norm_k.weight"], eps=1e-6).unflatten(2, (HEADS, -1))
        v = lin(x, "v").unflatten(2, (HEADS, -1))
        q, k = _rotate(q, rot), _rotate(k, rot)
        a = f.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        h = h + gate * lin(a.flatten(2), "o")
        x, gate = nz(h, "norm2")
        ff = f.linear(f.gelu(f.linear(x, sd[b + "ffn.0.weight"], sd[b + "ffn.0.bias"]), approximate="tanh"),
                      sd[b + "ffn.2.weight"], sd[b + "ffn.2.bias"])
        h = h + gate * ff
        out.append(f.linear(h, sd[f"proj_out.{i}.weight"], sd[f"proj_out.{i}.bias"]) * strength)
    return out


@torch.no_grad()
def reference(model, sd, inputs: ForwardInputs, control, strength):
    """diffusers' forward with WanUni3CCnetPatch's residuals added after each block (forward hooks):
    the net runs on the control's n rows, and row r of the batch gets control row r % n."""
    n = control.shape[0]
    ce = model.condition_embedder
    temb = ce.time_embedder(ce.timesteps_proj(inputs.timestep[:n]))
    residuals = control_residuals(sd, control, temb, strength)
    index = [r % n for r in range(inputs.batch)]
    hooks = [model.blocks[i].register_forward_hook(lambda m, a, o, res=res: o + res[index])
             for i, res in enumerate(residuals)]
    try:
        return tiny.reference_forward(model, inputs)
    finally:
        for h in hooks:
            h.remove()


def test_uni3c_matches_the_single_process_patch(checkpoints):
    import dataclasses

    path, model = checkpoints["i2v"]  # 36 input channels: the control takes x[:, :20] (noise + mask)
    sd = uni3c_state_dict(model.config.num_attention_heads * model.config.attention_head_dim)
    cases = []
    for batch, size, n, strength in ((2, (3, 6, 10), 1, 0.7), (1, (2, 8, 8), 1, -1.3), (2, (2, 8, 8), 2, 1.0)):
        kw = tiny.random_inputs("i2v", batch, *size, seed=11 + batch)
        g = torch.Generator().manual_seed(5)
        render = torch.randn(n, 16, *size, generator=g)
        control = torch.cat([kw.hidden_states[:n, :20], render], dim=1)
        plain = tiny.reference_forward(model, kw)
        ref = reference(model, sd, kw, control, strength)
        assert rel_err(plain, ref) > 1e-3  # the control changes the output
        cases.append((kw, control, strength, ref))
    for u, r, c, sharding in ((2, 1, 1, "none"), (1, 1, 2, "fsdp")):
        config = XDitUSPConfig(world_size=2, ulysses_degree=u, ring_degree=r, cfg_degree=c, device="cpu", dtype="fp32",
                               weight_sharding=sharding, launch_timeout_s=120, forward_timeout_s=120)
        with WorkerGroup(config) as group:
            group.load("m", path)
            key = group.uni3c_load(sd)
            assert group.uni3c_load(sd) == key  # held: nothing crosses again
            for kw, control, strength, ref in cases:
                out = group.forward("m", dataclasses.replace(kw, uni3c_input=control,
                                                             uni3c={"key": key, "strength": strength}))
                err = rel_err(out, ref)
                assert err <= TOL, (u, r, c, kw.batch, err)
            assert rel_err(group.forward("m", cases[0][0]), tiny.reference_forward(model, cases[0][0])) <= TOL  # off again
