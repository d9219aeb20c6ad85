"""The embedded tiny default Wan model: real diffusers classes, random weights, no download.

dim 256 (2 heads x 128, Wan's head_dim), 2 layers, ffn 512, text_dim 64. `heads` and `layers` change
the head count (dim = heads x 128: checkpoints carry no head count, and the key table reads it as dim /
128, Wan's; layouts with tensor x Ulysses > 2 need more than 2 heads) and the number of blocks. Used by the command line
job when no checkpoint is given, by the tests and by the transport benchmark.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .protocol import ForwardInputs

VARIANTS = ("t2v", "i2v", "flf2v", "vace", "ti2v_5b")
TEXT_DIM = 64
IMAGE_DIM = 64
IMAGE_TOKENS = 4  # per image; FLF2V has two images -> pos_embed_seq_len 8


def tiny_config(variant: str = "t2v", heads: int = 2, layers: int = 2) -> dict:
    """diffusers kwargs for a tiny model of `variant` with `heads` heads of 128 and `layers` blocks."""
    if heads < 1 or layers < 1:
        raise ValueError(f"the tiny model needs at least one head and one block, not {heads} and {layers}")
    cfg = dict(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=256, ffn_dim=512, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
        rope_max_seq_len=1024, pos_embed_seq_len=None,
    )
    if variant == "t2v":
        pass
    elif variant == "i2v":
        cfg.update(in_channels=36, image_dim=IMAGE_DIM, added_kv_proj_dim=heads * 128)
    elif variant == "flf2v":
        cfg.update(in_channels=36, image_dim=IMAGE_DIM, added_kv_proj_dim=heads * 128, pos_embed_seq_len=2 * IMAGE_TOKENS)
    elif variant == "vace":
        # with more blocks a second VACE hint lands late, so pipeline stages pass hints on
        cfg.update(vace_layers=[0] if layers <= 2 else [0, layers // 2], vace_in_channels=32)  # the spacing a file implies
    elif variant == "ti2v_5b":
        cfg.update(in_channels=48, out_channels=48)
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return cfg


def model_class(variant: str):
    import diffusers

    return diffusers.WanVACETransformer3DModel if variant == "vace" else diffusers.WanTransformer3DModel


@torch.no_grad()
def build_model(variant: str = "t2v", seed: int = 0, heads: int = 2, layers: int = 2):
    """A tiny fp32 diffusers model with every parameter drawn as randn * 0.02 (nothing zero)."""
    model = model_class(variant)(**tiny_config(variant, heads, layers))
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def patched_model(model, deltas: dict):
    """A copy of `model` with `deltas` ({parameter name: tensor}) added to its parameters: the
    single-process reference of a weight patch (a LoRA's strength * up @ down, a diff)."""
    import copy

    patched = copy.deepcopy(model)
    params = dict(patched.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].add_(delta)
    return patched


def original_state_dict(model, prefix: str = "", dtype=None) -> dict:
    """`model`'s weights under original (WanVideo/ComfyUI) key names, optionally prefixed and cast."""
    from ..wan_to_xdit_mapping import to_original

    sd = to_original(model.state_dict())
    return {prefix + k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in sd.items()}


def write_original_checkpoint(model, path, prefix: str = "", dtype=None, metadata: dict | None = None) -> str:
    """Save `model` as a Wan checkpoint with original key names (safetensors `metadata` optional)."""
    from safetensors.torch import save_file

    save_file(original_state_dict(model, prefix, dtype), str(path), metadata=metadata)
    return str(path)


def random_inputs(variant: str, batch: int, latent_frames: int, latent_h: int, latent_w: int,
                  text_tokens: int = 512, seed: int = 1) -> ForwardInputs:
    """Forward inputs for a model of `variant` and a latent of the given size.

    Image features are [B, tokens, dim] (FLF2V: both images' tokens concatenated, as ComfyUI sends
    them); timesteps differ per sample; TI2V-5B gets per-frame timesteps like ComfyUI's Wan 2.2."""
    cfg = tiny_config(variant)
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        hidden_states=torch.randn(batch, cfg["in_channels"], latent_frames, latent_h, latent_w, generator=g),
        timestep=torch.linspace(900.0, 300.0, batch),
        encoder_hidden_states=torch.randn(batch, text_tokens, TEXT_DIM, generator=g),
    )
    if variant in ("i2v", "flf2v"):
        n = IMAGE_TOKENS * (2 if variant == "flf2v" else 1)
        kw["encoder_hidden_states_image"] = torch.randn(batch, n, IMAGE_DIM, generator=g)
    elif variant == "vace":
        kw["control_hidden_states"] = torch.randn(batch, cfg["vace_in_channels"], latent_frames, latent_h, latent_w,
                                                  generator=g)
    elif variant == "ti2v_5b":
        t = torch.linspace(900.0, 300.0, batch)[:, None].repeat(1, latent_frames)
        t[:, 0] = 0.0  # first frame is the conditioning image, as in ComfyUI's WAN22 process_timestep
        kw["timestep"] = t
    return ForwardInputs(**kw)


@torch.no_grad()
def reference_forward(model, inputs: ForwardInputs) -> torch.Tensor:
    """Plain single-process diffusers forward of the same inputs (the parity reference).

    Converts our input conventions to diffusers': per-frame timesteps -> per-token, FLF2V image
    tokens [B, 2n, dim] -> [2B, n, dim]. (diffusers' processor assumes 512 text tokens when image
    tokens are present, hence random_inputs' default.)"""
    if inputs.audio_key is not None:
        raise ValueError("reference_forward is the plain Wan forward: it has no audio patch")
    kw = {k: v for k, v in dataclasses.asdict(inputs).items()  # compile: how, not what
          if v is not None and k not in ("compile", "audio_tokens", "audio_key", "audio_scale", "audio_ref_masks")}
    x, t = kw["hidden_states"], kw["timestep"]
    p_t, p_h, p_w = model.config.patch_size
    if t.ndim == 2 and t.shape[1] == x.shape[2] // p_t:
        kw["timestep"] = t.repeat_interleave((x.shape[3] // p_h) * (x.shape[4] // p_w), dim=1)
    img = kw.get("encoder_hidden_states_image")
    if img is not None and model.config.pos_embed_seq_len:
        kw["encoder_hidden_states_image"] = img.reshape(img.shape[0] * 2, img.shape[1] // 2, img.shape[2])
    return model(**kw, return_dict=False)[0]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The parity measure: max |out - ref| / max |ref|, in fp32."""
    ref = ref.float()
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in fp64: the error measure against an fp32 reference (issue 13). Unlike
    the max-abs ratio it weighs every element, so a drift spread over the whole output shows."""
    ref = ref.double()
    return (torch.linalg.vector_norm(out.double() - ref) / torch.linalg.vector_norm(ref)).item()


@torch.no_grad()
def reference_from_checkpoint(path, info, inputs: ForwardInputs, device="cpu", dtype=torch.float32,
                              batch_chunk: int | None = None) -> torch.Tensor:
    """Plain single-process diffusers forward of `inputs` with the weights of `path` (file already
    inspected: `info`), on `device`, returned on the CPU in fp32.

    dtype float32 is the reference every layout is measured against; bfloat16 keeps the modules
    diffusers keeps in fp32 (`_keep_in_fp32_modules`) in fp32, as the workers do, and gives the
    single-GPU rounding floor. The weights stream from the file onto `device` (one model's worth of
    `device` memory); TF32 is off while it runs, so an fp32 reference is fp32. `batch_chunk` runs
    the batch in pieces to bound activation memory."""
    import diffusers
    from accelerate import init_empty_weights

    from ..wan_to_xdit_mapping import fp32_predicate, iter_checkpoint

    cls = getattr(diffusers, info.diffusers_class)
    with init_empty_weights():  # parameters on meta; buffers (RoPE tables) computed on the CPU
        model = cls(**info.diffusers_config)
    keep = fp32_predicate(cls)
    _, tensors = iter_checkpoint(path, torch.float32, info=info)
    state = {name: t.to(device, torch.float32 if keep(name) else dtype) for name, t in tensors}
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.to(device).eval()
    fields = {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs)}
    fields = {k: (v.to(device, dtype if k != "timestep" and v.is_floating_point() else v.dtype)
                  if torch.is_tensor(v) else v) for k, v in fields.items()}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        n = fields["hidden_states"].shape[0]
        step = batch_chunk or n
        outs = []
        for i in range(0, n, step):
            part = ForwardInputs(**{k: (v[i:i + step] if torch.is_tensor(v) and v.ndim and v.shape[0] == n else v)
                                    for k, v in fields.items()})
            outs.append(reference_forward(model, part).float().cpu())
        return torch.cat(outs)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        del model
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()


# ---- the embedded tiny Wan VAE ------------------------------------------------------------------------
VAE_VERSIONS = ("2.1", "2.2")


def tiny_vae_config(version: str = "2.1") -> dict:
    """diffusers ``AutoencoderKLWan`` kwargs of a tiny VAE with the real structure: Wan 2.1 (z 16,
    8x) or Wan 2.2 (z 48, residual up/down blocks, 2x2 patchify: 16x), few channels."""
    from ..wan_to_xdit_mapping import VAE_DIM_MULT, VAE_NUM_RES_BLOCKS

    cfg = dict(base_dim=8, z_dim=16, dim_mult=list(VAE_DIM_MULT), num_res_blocks=VAE_NUM_RES_BLOCKS,
               attn_scales=[], temperal_downsample=[False, True, True], latents_mean=[0.0] * 16,
               latents_std=[1.0] * 16)
    if version == "2.2":
        cfg.update(decoder_base_dim=12, z_dim=48, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                   scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
    elif version != "2.1":
        raise ValueError(f"unknown Wan VAE version {version!r}; choose from {VAE_VERSIONS}")
    return cfg


def real_vae_config(version: str = "2.1") -> dict:
    """The real Wan 2.1 (base_dim 96, z 16) / Wan 2.2 (160 / decoder 256, z 48) VAE config."""
    cfg = tiny_vae_config(version)
    cfg.update(base_dim=96) if version == "2.1" else cfg.update(base_dim=160, decoder_base_dim=256)
    return cfg


@torch.no_grad()
def build_vae(version: str = "2.1", seed: int = 0, config: dict | None = None):
    """A diffusers ``AutoencoderKLWan`` (fp32, eval) with diffusers' own random init under `seed`
    and random RMS-norm gains, so nothing is the identity."""
    import diffusers

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLWan(**(config or tiny_vae_config(version)))
    g = torch.Generator().manual_seed(seed)
    for name, p in vae.named_parameters():
        if name.endswith("gamma"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    return vae.eval()


def vae_comfy_state_dict(vae, version: str) -> dict:
    """The VAE's weights under ComfyUI's (the original Wan repo's) names, as ComfyUI's VAE holds them."""
    from ..wan_to_xdit_mapping import vae_to_original

    return vae_to_original(vae.state_dict(), version)


@torch.no_grad()
def vae_reference(vae, x: torch.Tensor, encode: bool) -> torch.Tensor:
    """The single-process diffusers decode (latent -> pixels in [-1, 1]) or encode (pixels ->
    posterior mean), fp32 on the CPU."""
    if encode:
        return vae.encode(x, return_dict=False)[0].mode().float()
    return vae.decode(x, return_dict=False)[0].float()


# ---- Uni3C (parallel/uni3c.py): a tiny random control net and the single-process reference ---------
# written from ComfyUI's comfy/ldm/wan/uni3c.py and WanUni3CCnetPatch, not from parallel/uni3c.py
UNI3C_HEADS = 16  # ComfyUI always builds 16 heads


def uni3c_state_dict(model_dim: int, seed: int = 3, dim: int = 192, conv_out: int = 96, ffn: int = 64,
                     layers: int = 2, std: float = 0.1) -> dict:
    """A random Uni3C net under ComfyUI's names (after ModelPatchLoader's key conversion), mask
    embedding included (ComfyUI builds it; the patch never uses it). The default is tiny: 16 heads
    of 12 (RoPE axes 4 + 4 + 4), 2 layers; ComfyUI's defaults are dim 1024, conv_out 5120, ffn 8192,
    20 layers."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * std

    sd = {"controlnet_patch_embedding.weight": r(conv_out, 36, 1, 2, 2), "controlnet_patch_embedding.bias": r(conv_out),
          "proj_in.weight": r(dim, conv_out), "proj_in.bias": r(dim),
          "controlnet_mask_embedding.mask_proj.0.weight": r(8, 7, 4, 8, 8)}
    for i in range(layers):
        b = f"controlnet_blocks.{i}."
        for n in ("norm1", "norm2"):
            sd.update({b + n + ".linear.weight": r(3 * dim, model_dim), b + n + ".linear.bias": r(3 * dim),
                       b + n + ".norm.weight": 1 + r(dim), b + n + ".norm.bias": r(dim)})
        for n in "qkvo":
            sd.update({b + f"self_attn.{n}.weight": r(dim, dim), b + f"self_attn.{n}.bias": r(dim)})
        sd.update({b + "self_attn.norm_q.weight": 1 + r(dim), b + "self_attn.norm_k.weight": 1 + r(dim),
                   b + "ffn.0.weight": r(ffn, dim), b + "ffn.0.bias": r(ffn),
                   b + "ffn.2.weight": r(dim, ffn), b + "ffn.2.bias": r(dim),
                   f"proj_out.{i}.weight": r(model_dim, dim), f"proj_out.{i}.bias": r(model_dim)})
    return sd


def _uni3c_rope(grid, head_dim, device):
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
    return torch.polar(torch.ones_like(a), a).to(torch.complex64).to(device)


def _uni3c_rotate(x, rot):  # x [B, S, H, D], interleaved pairs
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * rot[None, :, None]).flatten(-2)


def uni3c_residuals(sd, control, temb, strength):
    """uni3c.py's process_input + forward_block for each layer, fp32: the residuals [n, S, model_dim]."""
    f = torch.nn.functional
    layers = sum(1 for k in sd if k.startswith("proj_out.") and k.endswith(".weight"))
    dim = sd["proj_in.weight"].shape[0]
    h = f.conv3d(control.float(), sd["controlnet_patch_embedding.weight"], sd["controlnet_patch_embedding.bias"],
                 stride=(1, 2, 2))
    grid = tuple(h.shape[2:])
    h = f.linear(h.flatten(2).transpose(1, 2), sd["proj_in.weight"], sd["proj_in.bias"])
    rot = _uni3c_rope(grid, dim // UNI3C_HEADS, h.device)
    out = []
    for i in range(layers):
        b = f"controlnet_blocks.{i}."

        def nz(x, n):
            shift, scale, gate = f.linear(f.silu(temb), sd[b + n + ".linear.weight"], sd[b + n + ".linear.bias"]).chunk(3, 1)
            x = f.layer_norm(x, (dim,), sd[b + n + ".norm.weight"], sd[b + n + ".norm.bias"], eps=1e-5)
            return x * (1 + scale[:, None]) + shift[:, None], gate[:, None]

        def lin(x, n):
            return f.linear(x, sd[b + f"self_attn.{n}.weight"], sd[b + f"self_attn.{n}.bias"])

        def heads(x):
            return x.unflatten(2, (UNI3C_HEADS, -1))

        x, gate = nz(h, "norm1")
        q = _uni3c_rotate(heads(f.rms_norm(lin(x, "q"), (dim,), sd[b + "self_attn.norm_q.weight"], eps=1e-6)), rot)
        k = _uni3c_rotate(heads(f.rms_norm(lin(x, "k"), (dim,), sd[b + "self_attn.norm_k.weight"], eps=1e-6)), rot)
        v = heads(lin(x, "v"))
        a = f.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        h = h + gate * lin(a.flatten(2), "o")
        x, gate = nz(h, "norm2")
        ff = f.linear(f.gelu(f.linear(x, sd[b + "ffn.0.weight"], sd[b + "ffn.0.bias"]), approximate="tanh"),
                      sd[b + "ffn.2.weight"], sd[b + "ffn.2.bias"])
        h = h + gate * ff
        out.append(f.linear(h, sd[f"proj_out.{i}.weight"], sd[f"proj_out.{i}.bias"]) * strength)
    return out


@torch.no_grad()
def uni3c_reference(model, sd, inputs: ForwardInputs, control, strength):
    """diffusers' forward (fp32, the tensors' device) with WanUni3CCnetPatch's residuals added after
    each block (forward hooks): the net runs on the control's n rows (temb: diffusers' time
    embedding, native's vec, of their timesteps), and row r of the batch gets control row r % n."""
    n = control.shape[0]
    ce = model.condition_embedder
    t = inputs.timestep[:n]
    temb = ce.time_embedder(ce.timesteps_proj(t[:, 0] if t.ndim == 2 else t))
    residuals = uni3c_residuals(sd, control, temb, strength)
    index = [r % n for r in range(inputs.batch)]
    hooks = [model.blocks[i].register_forward_hook(lambda m, a, o, res=res: o + res[index])
             for i, res in enumerate(residuals)]
    try:
        return reference_forward(model, inputs)
    finally:
        for h in hooks:
            h.remove()
