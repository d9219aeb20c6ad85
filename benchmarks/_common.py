"""Shared helpers for the benchmarks: this checkout as `comfyui_xdit_usp`, timers, model shapes."""
from __future__ import annotations

import os
import runpy
import statistics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Importing this module binds the checkout's folder to `comfyui_xdit_usp`, whatever the folder is called
# and whatever is installed under that name (parallel/_entry.py; the workers and the tests do the same).
runpy.run_path(os.path.join(REPO, "parallel", "_entry.py"))["bind_package"]()

# Real Wan shapes (diffusers configs); random weights, no download.
SHAPES = {
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256),
    "14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256),
    # CPU dry runs of the GPU scripts: 4 heads (of Wan's 128, which the key table infers the head count
    # from) so that Ulysses 4 and hybrid layouts exist.
    "tiny": dict(num_attention_heads=4, attention_head_dim=128, ffn_dim=256, num_layers=2, in_channels=16,
                 out_channels=16, text_dim=64, freq_dim=256),
}
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280), "tiny": (64, 96)}


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
