"""Tiny random Wan transformers for CPU tests (no downloads).  Shared by mapping and runtime tests."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wan_to_xdit_mapping import to_original  # noqa: E402

VARIANTS = ("t2v", "i2v", "flf2v", "vace", "ti2v_5b")

TEXT_DIM = 64
TEXT_LEN = 512          # diffusers' WanAttnProcessor hardcodes 512 text tokens when image tokens are present
IMAGE_DIM = 64
IMAGE_TOKENS = 4        # per image; FLF2V has two images -> pos_embed_seq_len 8


def tiny_config(variant: str) -> dict:
    """diffusers kwargs for a tiny model of ``variant``: dim 256 (2 heads x 128), 2 layers, ffn 512."""
    cfg = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=256, ffn_dim=512, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
        rope_max_seq_len=1024, pos_embed_seq_len=None,
    )
    if variant == "t2v":
        pass
    elif variant == "i2v":
        cfg.update(in_channels=36, image_dim=IMAGE_DIM, added_kv_proj_dim=256)
    elif variant == "flf2v":
        cfg.update(in_channels=36, image_dim=IMAGE_DIM, added_kv_proj_dim=256, pos_embed_seq_len=2 * IMAGE_TOKENS)
    elif variant == "vace":
        cfg.update(vace_layers=[0], vace_in_channels=32)  # original Wan VACE: a hint every 2nd layer
    elif variant == "ti2v_5b":
        cfg.update(in_channels=48, out_channels=48)
    else:
        raise ValueError(variant)
    return cfg


def model_class(variant: str):
    import diffusers

    return diffusers.WanVACETransformer3DModel if variant == "vace" else diffusers.WanTransformer3DModel


@torch.no_grad()
def build_model(variant: str, seed: int = 0):
    """A tiny diffusers model with every parameter re-drawn as randn * 0.02 (nothing zero), fp32, eval."""
    model = model_class(variant)(**tiny_config(variant))
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def original_state_dict(model, prefix: str = "", dtype=None) -> dict:
    sd = to_original(model.state_dict())
    return {prefix + k: (v.to(dtype) if dtype is not None else v).contiguous().clone() for k, v in sd.items()}


def to_original_file(model, path, prefix: str = "", dtype=None) -> str:
    """Write ``model``'s weights as an original-format (optionally prefixed) safetensors file."""
    from safetensors.torch import save_file

    save_file(original_state_dict(model, prefix, dtype), str(path))
    return str(path)


def example_inputs(variant: str, seed: int = 1) -> dict:
    """Forward kwargs for a tiny model: latents [1, C, 2, 8, 8], one timestep, text (and image/control)."""
    cfg = tiny_config(variant)
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        hidden_states=torch.randn(1, cfg["in_channels"], 2, 8, 8, generator=g),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, TEXT_LEN if cfg["image_dim"] else 8, TEXT_DIM, generator=g),
        return_dict=False,
    )
    if variant == "i2v":
        kw["encoder_hidden_states_image"] = torch.randn(1, IMAGE_TOKENS, IMAGE_DIM, generator=g)
    elif variant == "flf2v":
        kw["encoder_hidden_states_image"] = torch.randn(2, IMAGE_TOKENS, IMAGE_DIM, generator=g)
    elif variant == "vace":
        kw["control_hidden_states"] = torch.randn(1, cfg["vace_in_channels"], 2, 8, 8, generator=g)
    return kw
