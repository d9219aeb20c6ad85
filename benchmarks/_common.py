"""Shared helpers for the benchmarks: import the pack from this checkout, timers, model shapes."""
from __future__ import annotations

import importlib
import os
import statistics
import sys
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Real Wan shapes (diffusers configs); random weights, no download.
SHAPES = {
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256),
    "14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256),
}
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}


def pack():
    """The pack as a package, whatever this checkout's folder is called (like parallel/_entry.py)."""
    try:
        return importlib.import_module("comfyui_xdit_usp")
    except ImportError:
        name = "_xdit_usp_bench"
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [REPO]
            sys.modules[name] = mod
        return sys.modules[name]


def sub(name: str):
    return importlib.import_module(pack().__name__ + "." + name)


def latent_shape(res: str, frames: int = 81, channels: int = 16):
    h, w = RESOLUTIONS[res]
    return (channels, (frames - 1) // 4 + 1, h // 8, w // 8)


def tokens(res: str, frames: int = 81) -> int:
    _, f, h, w = latent_shape(res, frames)
    return f * (h // 2) * (w // 2)


def cuda_time(fn, warmup: int = 1, reps: int = 3) -> float:
    """Median seconds per call, CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)
