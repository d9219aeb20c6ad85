"""The audio patch (InfiniteTalk / MultiTalk, single speaker) on sequence-sharded tokens: real torchrun +
gloo groups of 2 CPU ranks against a single-process reference written from ComfyUI's
comfy/ldm/wan/model_multitalk.py (MultiTalkCrossAttnPatch + SingleStreamAttention: after each
block's cross-attention, x <- x + scale * proj(attn(q_linear(norm_x(x)) of frame f, kv_linear(audio[f])))).

The latent 3 x 6 x 10 gives 3 frames of 15 tokens, 45 in all, padded to 46: the shard edge (23)
splits frame 1, so one frame's tokens are on two ranks. CFG split and the batch-1 fallback (Ulysses)
(ring 2) in one launch, Ulysses 2 in another.
"""
from __future__ import annotations

import dataclasses

import torch

from comfyui_xdit_usp.parallel import WorkerGroup, XDitUSPConfig, tiny
from comfyui_xdit_usp.parallel.tiny import rel_err

TOL = 1e-5
SIZE = (3, 6, 10)
HEADS, AUDIO_DIM, AUDIO_TOKENS = 4, 32, 6  # the audio attention's own heads (ComfyUI: 40)


def _audio_patch(dim: int, blocks: int, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.05):
        return torch.randn(*shape, generator=g) * s

    t = {}
    for i in range(blocks):
        b = f"blocks.{i}."
        t[b + "norm_x.weight"], t[b + "norm_x.bias"] = 1 + r(dim, s=0.1), r(dim, s=0.1)
        a = b + "audio_cross_attn."
        t[a + "q_linear.weight"], t[a + "q_linear.bias"] = r(dim, dim, s=0.2), r(dim)
        t[a + "kv_linear.weight"], t[a + "kv_linear.bias"] = r(2 * dim, AUDIO_DIM, s=0.2), r(2 * dim)
        t[a + "proj.weight"], t[a + "proj.bias"] = r(dim, dim, s=0.2), r(dim)
    return t


def _native_audio(w: dict, i: int, x: torch.Tensor, audio: torch.Tensor, grid: tuple, scale: float) -> torch.Tensor:
    """MultiTalkCrossAttnPatch on block i's stream x [B, N_t*S, dim] (SingleStreamAttention.forward's
    layout: (B N_t) S), the audio [N_t, tokens, C] the same for every row; softmax written out."""
    n_t, s = grid[0], grid[1] * grid[2]
    b, _, dim = x.shape
    p = f"blocks.{i}."
    a = p + "audio_cross_attn."
    norm_x = torch.nn.functional.layer_norm(x, (dim,), w[p + "norm_x.weight"], w[p + "norm_x.bias"], 1e-5)
    h = norm_x.view(b * n_t, s, dim)
    q = (h @ w[a + "q_linear.weight"].T + w[a + "q_linear.bias"]).view(b * n_t, s, HEADS, dim // HEADS)
    enc = audio.repeat(b, 1, 1)
    kv = enc @ w[a + "kv_linear.weight"].T + w[a + "kv_linear.bias"]
    k, v = kv.view(b * n_t, enc.shape[1], 2, HEADS, dim // HEADS).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    att = torch.softmax(q @ k.transpose(-1, -2) / (dim // HEADS) ** 0.5, dim=-1) @ v
    out = att.transpose(1, 2).reshape(b * n_t, s, dim) @ w[a + "proj.weight"].T + w[a + "proj.bias"]
    return x + out.view(b, n_t * s, dim) * scale


@torch.no_grad()
def _reference(model, kw, w, audio, scale) -> torch.Tensor:
    """diffusers' forward with the patch where native Wan calls attn2_patch (after the cross-attention
    residual, before the FFN): attn2 returns attn + audio(x + attn) - x, x captured at norm2's input."""
    p_t, p_h, p_w = model.config.patch_size
    _, _, f, h, wd = kw.hidden_states.shape
    grid = (f // p_t, h // p_h, wd // p_w)
    handles, originals = [], []
    for i, block in enumerate(model.blocks):
        seen = {}
        handles.append(block.norm2.register_forward_pre_hook(lambda m, args, seen=seen: seen.update(x=args[0])))

        def attn2(*args, _orig=block.attn2.forward, _i=i, _seen=seen, **kwargs):
            y = _orig(*args, **kwargs)
            x = _seen["x"] + y
            return _native_audio(w, _i, x, audio, grid, scale) - _seen["x"]

        originals.append(block.attn2.forward)
        block.attn2.forward = attn2
    try:
        return tiny.reference_forward(model, kw)
    finally:
        for hd in handles:
            hd.remove()
        for block in model.blocks:
            del block.attn2.forward  # the instance attribute: back to the class's forward


def _config(ulysses, ring, cfg) -> XDitUSPConfig:
    return XDitUSPConfig(world_size=ulysses * ring * cfg, ulysses_degree=ulysses, ring_degree=ring, cfg_degree=cfg,
                         device="cpu", dtype="fp32", launch_timeout_s=120, forward_timeout_s=120)


def test_audio_patch_matches_the_single_process_reference(checkpoints):
    path, model = checkpoints["t2v"]
    w = _audio_patch(model.config.num_attention_heads * model.config.attention_head_dim, len(model.blocks))
    g = torch.Generator().manual_seed(11)
    audio = torch.randn(SIZE[0], AUDIO_TOKENS, AUDIO_DIM, generator=g)
    kw2 = tiny.random_inputs("t2v", 2, *SIZE, text_tokens=16, seed=5)
    kw1 = dataclasses.replace(kw2, hidden_states=kw2.hidden_states[:1], timestep=kw2.timestep[:1],
                              encoder_hidden_states=kw2.encoder_hidden_states[:1])
    refs = {(b, s): _reference(model, kw, w, audio, s) for b, kw, s in ((2, kw2, 1.0), (1, kw1, -0.5))}
    plain = {1: tiny.reference_forward(model, kw1), 2: tiny.reference_forward(model, kw2)}
    assert rel_err(refs[2, 1.0], plain[2]) > 1e-2  # the audio changes the output: the test can fail
    errors = {}
    for u, r, c in ((1, 1, 2), (2, 1, 1)):  # cfg2 (batch 2) + its fallback ring2 (batch 1); ulysses2
        with WorkerGroup(_config(u, r, c)) as group:
            group.load("m", path)
            key = group.audio_load(w, HEADS)
            assert group.audio_load(w, HEADS) == key  # the same weights again: nothing sent
            for (b, s), ref in refs.items():
                kw = kw2 if b == 2 else kw1
                out = group.forward("m", dataclasses.replace(kw, audio_tokens=audio, audio_key=key, audio_scale=s))
                errors[u, r, c, b, s] = rel_err(out, ref)
            assert rel_err(group.forward("m", kw1), plain[1]) <= TOL  # no audio: the plain forward
            errors[u, r, c, "scale 0"] = rel_err(group.forward("m", dataclasses.replace(
                kw2, audio_tokens=audio, audio_key=key, audio_scale=0.0)), plain[2])
            assert group.launches == 1
    print({k: f"{e:.1e}" for k, e in errors.items()})
    assert all(e <= TOL for e in errors.values()), errors
