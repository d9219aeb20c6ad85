"""The audio patch (InfiniteTalk / MultiTalk, single speaker) on sequence-sharded tokens: real torchrun +
gloo groups of 2 CPU ranks against a single-process reference written from ComfyUI's
comfy/ldm/wan/model_multitalk.py (MultiTalkCrossAttnPatch + SingleStreamAttention: after each
block's cross-attention, x <- x + scale * proj(attn(q_linear(norm_x(x)) of frame f, kv_linear(audio[f])))).

The latent 3 x 6 x 10 gives 3 frames of 15 tokens, 45 in all, padded to 46: the shard edge (23)
splits frame 1, so one frame's tokens are on two ranks. Two speakers (MultiTalkGetAttnMapPatch's
speaker map from self-attention's q and the first frame's k, and SingleStreamMultiAttention's 1-D
RoPE by speaker) too: the 15 reference tokens lie on rank 0. CFG split and the batch-1 fallback (Ulysses)
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


def _rotate_half(x):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _rope_1d(x, pos):
    """RotaryPositionalEmbedding1D: x [B, H, n, D], pos [n]."""
    d = x.shape[-1]
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    freqs = (pos.float()[:, None] * freqs).repeat_interleave(2, dim=-1)
    return x * freqs.cos() + _rotate_half(x) * freqs.sin()


def _speaker_map(q, k, masks):
    """get_attn_map_with_target (split_num 2) of one sample: q, k [1, S, H, D] -> [2, S]."""
    ref_k = k[:, :masks.shape[1]]
    half = q.shape[2] // 2
    out = torch.zeros(2, q.shape[1])
    for i in range(2):
        vq = q[:, :, i * half:(i + 1) * half].transpose(1, 2) / q.shape[-1] ** 0.5
        att = vq @ ref_k[:, :, i * half:(i + 1) * half].permute(0, 2, 3, 1)
        att = (att - att.max(dim=-1, keepdim=True).values).exp()
        att = att / (att.sum(dim=-1, keepdim=True) + 1e-8)
        out += torch.cat([((att * m.view(1, 1, 1, -1)).sum(-1) / (m.sum() + 1e-8)).mean(dim=1) for m in masks])
    return out / 2


def _native_audio_two(w, i, x, audio, grid, scale, xmap):
    """SingleStreamMultiAttention (two speakers) on one sample x [1, N_t*S, dim] with its map [2, N_t*S]."""
    n_t, s = grid[0], grid[1] * grid[2]
    dim = x.shape[-1]
    p, a = f"blocks.{i}.", f"blocks.{i}.audio_cross_attn."
    h = torch.nn.functional.layer_norm(x, (dim,), w[p + "norm_x.weight"], w[p + "norm_x.bias"], 1e-5).view(n_t, s, dim)
    q = (h @ w[a + "q_linear.weight"].T + w[a + "q_linear.bias"]).view(n_t, s, HEADS, -1).permute(0, 2, 1, 3)
    lo, hi = xmap.min(1).values, xmap.max(1).values
    h1 = (xmap[0] - lo[0]) / (hi[0] - lo[0] + 1e-8) * 4.0
    h2 = (xmap[1] - lo[1]) / (hi[1] - lo[1] + 1e-8) * 4.0 + 20.0
    pos = torch.stack([h1, h2, torch.full_like(h1, 12.0)], dim=1)[torch.arange(xmap.shape[1]), xmap.argmax(dim=0)]
    q = _rope_1d(q.permute(1, 0, 2, 3).reshape(1, HEADS, n_t * s, -1), pos).reshape(HEADS, n_t, s, -1).permute(1, 0, 2, 3)
    n_a = audio.shape[1]
    kv = (audio @ w[a + "kv_linear.weight"].T + w[a + "kv_linear.bias"]).view(n_t, n_a, 2, HEADS, -1).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    kpos = torch.full((n_a,), 22.0)
    kpos[: n_a // 2] = 2.0
    k = _rope_1d(k.permute(1, 0, 2, 3).reshape(1, HEADS, n_t * n_a, -1), kpos.repeat(n_t))
    k = k.reshape(HEADS, n_t, n_a, -1).permute(1, 0, 2, 3)
    att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
    out = att.transpose(1, 2).reshape(n_t, s, dim) @ w[a + "proj.weight"].T + w[a + "proj.bias"]
    return x + out.reshape(1, n_t * s, dim) * scale


@torch.no_grad()
def _reference(model, kw, w, audio, scale, masks=None) -> torch.Tensor:
    """diffusers' forward with the patch where native Wan calls attn2_patch (after the cross-attention
    residual, before the FFN): attn2 returns attn + audio(x + attn) - x, x captured at norm2's input."""
    p_t, p_h, p_w = model.config.patch_size
    _, _, f, h, wd = kw.hidden_states.shape
    grid = (f // p_t, h // p_h, wd // p_w)
    import diffusers.models.transformers.transformer_wan as tw

    handles, calls = [], []  # calls: (query, key) of every attention call; a block's self-attention is
    dispatch = tw.dispatch_attention_fn  # the last one before its norm2 (then comes its cross-attention)

    def capture(query, key, *args, **kwargs):
        calls.append((query, key))
        return dispatch(query, key, *args, **kwargs)

    for i, block in enumerate(model.blocks):
        seen = {}
        handles.append(block.norm2.register_forward_pre_hook(
            lambda m, args, seen=seen: seen.update(x=args[0], qk=calls[-1])))

        def attn2(*args, _orig=block.attn2.forward, _i=i, _seen=seen, **kwargs):
            y = _orig(*args, **kwargs)
            x = _seen["x"] + y
            if masks is None:
                return _native_audio(w, _i, x, audio, grid, scale) - _seen["x"]
            q, k = _seen["qk"]
            rows = [_native_audio_two(w, _i, x[b:b + 1], audio, grid, scale, _speaker_map(q[b:b + 1], k[b:b + 1], masks))
                    for b in range(x.shape[0])]
            return torch.cat(rows) - _seen["x"]

        block.attn2.forward = attn2
    tw.dispatch_attention_fn = capture
    try:
        return tiny.reference_forward(model, kw)
    finally:
        tw.dispatch_attention_fn = dispatch
        for hd in handles:
            hd.remove()
        for block in model.blocks:
            del block.attn2.forward  # the instance attribute: back to the class's forward


def _config(ulysses, ring, cfg) -> XDitUSPConfig:
    return XDitUSPConfig(world_size=ulysses * ring * cfg, ulysses_degree=ulysses, ring_degree=ring, cfg_degree=cfg,
                         device="cpu", dtype="fp32", launch_timeout_s=120, forward_timeout_s=120)


def test_audio_patch_matches_the_single_process_reference(tmp_path):
    # q/k RMSNorm gains of ~4 instead of ~0.02: self-attention logits of order 10, so the speaker map
    # varies over the tokens (a flat map's min-max scaling would magnify rounding ~1e4 times)
    model = tiny.build_model("t2v", seed=6)
    with torch.no_grad():
        for block in model.blocks:
            block.attn1.norm_q.weight.mul_(200)
            block.attn1.norm_k.weight.mul_(200)
    path = tiny.write_original_checkpoint(model, tmp_path / "sharp.safetensors")
    w = _audio_patch(model.config.num_attention_heads * model.config.attention_head_dim, len(model.blocks))
    g = torch.Generator().manual_seed(11)
    audio = torch.randn(SIZE[0], AUDIO_TOKENS, AUDIO_DIM, generator=g)
    kw2 = tiny.random_inputs("t2v", 2, *SIZE, text_tokens=16, seed=5)
    kw1 = dataclasses.replace(kw2, hidden_states=kw2.hidden_states[:1], timestep=kw2.timestep[:1],
                              encoder_hidden_states=kw2.encoder_hidden_states[:1])
    masks = (torch.rand(2, SIZE[1] * SIZE[2] // 4, generator=g) > 0.5).float()
    masks[0, 0] = masks[1, 1] = 1.0
    refs = {(b, s, two): _reference(model, kw, w, audio, s, masks if two else None)
            for b, kw, s, two in ((2, kw2, 1.0, False), (1, kw1, -0.5, False), (2, kw2, 1.0, True), (1, kw1, 1.0, True))}
    plain = {1: tiny.reference_forward(model, kw1), 2: tiny.reference_forward(model, kw2)}
    assert rel_err(refs[2, 1.0, False], plain[2]) > 1e-2  # the audio changes the output: the test can fail
    assert rel_err(refs[2, 1.0, True], refs[2, 1.0, False]) > 1e-3  # and two speakers change it again
    errors = {}
    for u, r, c in ((1, 1, 2), (2, 1, 1)):  # cfg2 (batch 2) + its fallback ring2 (batch 1); ulysses2
        with WorkerGroup(_config(u, r, c)) as group:
            group.load("m", path)
            key = group.audio_load(w, HEADS)
            assert group.audio_load(w, HEADS) == key  # the same weights again: nothing sent
            for (b, s, two), ref in refs.items():
                kw = kw2 if b == 2 else kw1
                out = group.forward("m", dataclasses.replace(kw, audio_tokens=audio, audio_key=key, audio_scale=s,
                                                             audio_ref_masks=masks if two else None))
                errors[u, r, c, b, s, two] = rel_err(out, ref)
            assert rel_err(group.forward("m", kw1), plain[1]) <= TOL  # no audio: the plain forward
            errors[u, r, c, "scale 0"] = rel_err(group.forward("m", dataclasses.replace(
                kw2, audio_tokens=audio, audio_key=key, audio_scale=0.0)), plain[2])
            assert group.launches == 1
    print({k: f"{e:.1e}" for k, e in errors.items()})
    assert all(e <= TOL for e in errors.values()), errors
