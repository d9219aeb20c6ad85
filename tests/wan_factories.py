"""Tiny random Wan transformers for CPU tests (no downloads).  Shared by mapping and runtime tests."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wan_to_xdit_mapping import to_original  # noqa: E402

# The tiny models themselves are the runtime's embedded default model (parallel/tiny.py).
from comfyui_xdit_usp.parallel.tiny import IMAGE_DIM, IMAGE_TOKENS, TEXT_DIM, VARIANTS, build_model, model_class, tiny_config  # noqa: E402,F401

TEXT_LEN = 512          # diffusers' WanAttnProcessor hardcodes 512 text tokens when image tokens are present


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
