"""ComfyUI nodes: "XDit+USP Config" and "XDit+USP WanVideo Model Loader".

The loader's MODEL is a native ComfyUI Wan model (see xdit_usp_model.py) whose transformer forward
runs on a warm worker group with USP sequence parallelism; every sampling, LoRA and conditioning
node keeps working on it. This module imports nothing from ComfyUI at import time.
"""
from __future__ import annotations

import dataclasses
import os

from .parallel import XDitUSPConfig
from .parallel.config import ATTENTION_BACKENDS, DEVICES, DTYPES

CATEGORY = "WanVideo/xDiT-USP"
CONFIG_TYPE = "XDIT_USP_CONFIG"
WEIGHT_DTYPES = ("default",) + DTYPES


class XDitUSPConfigNode:
    """How the transformer is spread over the GPUs. Degrees of 0 are chosen automatically."""

    DESCRIPTION = ("Worker group layout for the XDit+USP WanVideo loader: how many GPUs, how the sequence is split "
                   "(Ulysses over heads, ring for the rest) and whether cond/uncond run on separate GPU groups (CFG). "
                   "One worker group runs per set of GPUs: a changed config replaces the previous group on them.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "gpus": ("INT", {"default": 2, "min": 1, "max": 64,
                                 "tooltip": "Worker processes: one per GPU (CPU ranks when device is cpu)."}),
                "ulysses_degree": ("INT", {"default": 0, "min": 0, "max": 64,
                                           "tooltip": "Ulysses (all-to-all over heads) degree; 0 = auto. Must divide the head count."}),
                "ring_degree": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "Ring-attention degree; 0 = auto."}),
                "cfg_degree": ("INT", {"default": 0, "min": 0, "max": 2,
                                       "tooltip": "1 or 2 GPU groups for cond/uncond; 0 = auto (2 when the GPU count is even)."}),
                "dtype": (list(DTYPES), {"default": "bf16", "tooltip": "Compute dtype of the transformer on the workers."}),
                "attention_backend": (list(ATTENTION_BACKENDS), {"default": "auto"}),
                "gpu_memory_fraction": ("FLOAT", {"default": 1.0, "min": 0.05, "max": 1.0, "step": 0.05,
                                                  "tooltip": "Cap on each worker's CUDA memory, as a fraction of its GPU."}),
                "device": (list(DEVICES), {"default": "cuda", "tooltip": "cuda, or cpu (gloo ranks; for testing)."}),
            }
        }

    RETURN_TYPES = (CONFIG_TYPE,)
    RETURN_NAMES = ("xdit_usp_config",)
    FUNCTION = "create"
    CATEGORY = CATEGORY

    def create(self, gpus, ulysses_degree, ring_degree, cfg_degree, dtype, attention_backend, gpu_memory_fraction, device):
        cfg = XDitUSPConfig(
            world_size=int(gpus), ulysses_degree=int(ulysses_degree), ring_degree=int(ring_degree),
            cfg_degree=int(cfg_degree), dtype=dtype, attention_backend=attention_backend,
            gpu_memory_fraction=float(gpu_memory_fraction), device=device,
        )
        cfg.validate()  # ValueError saying what would work
        return (cfg,)


def _diffusion_model_names() -> list[str]:
    try:
        import folder_paths
    except ImportError:  # outside ComfyUI
        return []
    return folder_paths.get_filename_list("diffusion_models")


class XDitUSPWanVideoModelLoader:
    """Loads a Wan 2.1/2.2 transformer on the worker group; returns a native MODEL."""

    DESCRIPTION = ("Loads a WanVideo transformer (Wan 2.1 / 2.2: T2V, I2V, FLF2V, VACE, TI2V-5B; original, ComfyUI or "
                   "diffusers layout; bf16/fp16/fp32/fp8) from diffusion_models onto the XDit+USP worker group. The MODEL "
                   "works with every native sampling node; LoRAs (LoraLoaderModelOnly) are applied on the workers.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "unet_name": (_diffusion_model_names(), {"tooltip": "A Wan transformer from models/diffusion_models."}),
                "weight_dtype": (list(WEIGHT_DTYPES), {
                    "default": "default",
                    "tooltip": "dtype the workers hold and compute the weights in; default = the config's dtype. "
                               "Another value needs its own worker group, which replaces the config's group on "
                               "these GPUs while in use (models on the other group reload when next used)."}),
                "xdit_usp_config": (CONFIG_TYPE,),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, unet_name, weight_dtype, xdit_usp_config):
        import folder_paths

        from .wan_to_xdit_mapping import inspect_checkpoint

        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        cfg = xdit_usp_config
        if not isinstance(cfg, XDitUSPConfig):
            raise ValueError(f"xdit_usp_config must come from an XDit+USP Config node, got {type(cfg).__name__}")
        if weight_dtype != "default" and weight_dtype != cfg.dtype:
            cfg = dataclasses.replace(cfg, dtype=weight_dtype)
        cfg.validate()
        ckpt = inspect_checkpoint(path)  # header only; a bad file fails here
        cfg.resolve(ckpt.num_heads)  # a layout the heads can't take fails here, before any launch

        from .xdit_usp_model import build_model_patcher

        return (build_model_patcher(cfg, os.path.abspath(path), ckpt),)


NODE_CLASS_MAPPINGS = {
    "XDitUSPConfigNode": XDitUSPConfigNode,
    "XDitUSPWanVideoModelLoader": XDitUSPWanVideoModelLoader,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "XDitUSPConfigNode": "XDit+USP Config",
    "XDitUSPWanVideoModelLoader": "XDit+USP WanVideo Model Loader",
}
