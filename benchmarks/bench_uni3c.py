"""Uni3C camera control on the worker group (parallel/uni3c.py), on GPUs.

1. Parity: a tiny i2v model and a tiny random Uni3C net, bf16 on N GPUs (Ulysses N with batch 1;
   CFG split with batch 2, one cond's control shared) and on one GPU, each against the fp32
   single-process reference `tiny.uni3c_reference` (TF32 off) by relative L2; the N-GPU error over
   the one-GPU error must be <= 1.5 (the repository's GPU parity rule).
2. Cost: a forward of a random-weight Wan model of a real shape (`--model`, default 1.3b) with and
   without a random Uni3C net of ComfyUI's default sizes (dim 1024, 20 layers, FFN 8192, conv 5120),
   bf16, at `--res` x `--frames`, per layout; the net's load time and bytes a rank holds.

    python benchmarks/bench_uni3c.py --gpus 2 --json out.json
    python benchmarks/bench_uni3c.py --device cpu --gpus 2 --model tiny --res tiny --frames 5   # dry run

Prints one JSON object (and writes it to --json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402,F401  (binds the package)

import torch  # noqa: E402

from comfyui_xdit_usp.parallel import WorkerGroup, XDitUSPConfig, tiny  # noqa: E402
from comfyui_xdit_usp.parallel.protocol import ForwardInputs  # noqa: E402


def config(device, gpus, dtype, **degrees) -> XDitUSPConfig:
    return XDitUSPConfig(world_size=gpus, device=device, dtype=dtype, launch_timeout_s=300, forward_timeout_s=600,
                         **degrees)


def parity(device: str, gpus: int, directory: str) -> dict:
    model = tiny.build_model("i2v", seed=2)
    path = tiny.write_original_checkpoint(model, os.path.join(directory, "tiny_i2v.safetensors"))
    sd = tiny.uni3c_state_dict(model.config.num_attention_heads * model.config.attention_head_dim)
    dtype = "bf16" if device == "cuda" else "fp32"
    cases = {}
    size = (5, 30, 52) if device == "cuda" else (2, 6, 10)  # 1950 tokens; 30 on a CPU dry run
    for batch in (1, 2):
        kw = tiny.random_inputs("i2v", batch, *size, seed=3 + batch)
        g = torch.Generator().manual_seed(5)
        control = torch.cat([kw.hidden_states[:1, :20], torch.randn(1, 16, *size, generator=g)], dim=1)
        cases[batch] = (kw, control)
    refs = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        m = model.to(device)
        dsd = {k: v.to(device) for k, v in sd.items()}
        for batch, (kw, control) in cases.items():
            moved = dataclasses.replace(kw, **{k: v.to(device) for k, v in kw.tensors().items()})
            refs[batch] = tiny.uni3c_reference(m, dsd, moved, control.to(device), 0.8).cpu()
        model.to("cpu")
        del m, dsd
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    out = {}
    layouts = {"1gpu": (1, dict()), f"ulysses{gpus}": (gpus, dict(ulysses_degree=gpus, ring_degree=1, cfg_degree=1)),
               "cfg2": (gpus, dict(cfg_degree=2))}
    for name, (n, degrees) in layouts.items():
        with WorkerGroup(config(device, n, dtype, **degrees)) as group:
            group.load("m", path)
            key = group.uni3c_load(sd)
            for batch, (kw, control) in cases.items():
                if name == "cfg2" and batch == 1 or name.startswith("ulysses") and batch == 2:
                    continue
                y = group.forward("m", dataclasses.replace(kw, uni3c_input=control, uni3c={"key": key, "strength": 0.8}))
                out[f"{name}_batch{batch}"] = tiny.rel_l2(y, refs[batch])
    out["ratio_ulysses_vs_1gpu"] = out[f"ulysses{gpus}_batch1"] / max(out["1gpu_batch1"], 1e-12)
    out["ratio_cfg2_vs_1gpu"] = out["cfg2_batch2"] / max(out["1gpu_batch2"], 1e-12)
    return out


def cost(device: str, gpus: int, model_name: str, res: str, frames: int, reps: int, directory: str) -> dict:
    import bench_scaling

    path = bench_scaling.write_checkpoint(model_name, directory)
    shape = _common.SHAPES[model_name]
    dim, text_dim = shape["num_attention_heads"] * shape["attention_head_dim"], shape["text_dim"]
    net = dict(dim=192, conv_out=96, ffn=64, layers=2) if model_name == "tiny" else \
        dict(dim=1024, conv_out=5120, ffn=8192, layers=20, std=0.02)  # ComfyUI's defaults; small weights: finite in bf16
    t0 = time.perf_counter()
    sd = {k: v.to(torch.bfloat16) for k, v in tiny.uni3c_state_dict(dim, **net).items()}
    make_s = time.perf_counter() - t0
    c, f, h, w = _common.latent_shape(res, frames)
    dtype = "bf16" if device == "cuda" else "fp32"
    results = {"uni3c_params": sum(v.numel() for v in sd.values()), "make_s": make_s,
               "latent": [c, f, h, w]}
    for name, batch, degrees in (("ulysses", 1, dict(ulysses_degree=gpus, ring_degree=1, cfg_degree=1)),
                                 ("cfg2", 2, dict(cfg_degree=2))):
        g = torch.Generator().manual_seed(1)
        kw = ForwardInputs(hidden_states=torch.randn(batch, c, f, h, w, generator=g),
                                timestep=torch.full((batch,), 700.0),
                                encoder_hidden_states=torch.randn(batch, 512, text_dim, generator=g) * 0.1)
        control = torch.cat([kw.hidden_states[:1, :20] if c >= 20 else torch.cat(
            [kw.hidden_states[:1], torch.zeros(1, 20 - c, f, h, w)], dim=1), torch.randn(1, 16, f, h, w, generator=g)], dim=1)
        with WorkerGroup(config(device, gpus, dtype, **degrees)) as group:
            group.load("m", path)
            t0 = time.perf_counter()
            key = group.uni3c_load(sd)
            load_s = time.perf_counter() - t0
            with_u = dataclasses.replace(kw, uni3c_input=control, uni3c={"key": key, "strength": 1.0})
            row = {"uni3c_load_s": load_s, "uni3c_param_bytes_per_rank": group.uni3c[2]}
            for label, inputs in (("plain", kw), ("uni3c", with_u)):
                group.forward("m", inputs)  # warm-up
                times, peaks = [], []
                for _ in range(reps):
                    stats = {}
                    t0 = time.perf_counter()
                    group.forward("m", inputs, stats=stats)
                    times.append(time.perf_counter() - t0)
                    peaks.append(max((b or 0) for b in stats.get("peak_bytes") or [0]))
                row[f"{label}_s"] = min(times)
                row[f"{label}_peak_gib"] = max(peaks) / 2**30
                row[f"{label}_layout"] = str(stats.get("layout"))
            row["overhead"] = row["uni3c_s"] / row["plain_s"] - 1
            results[f"{name}_batch{batch}"] = row
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--model", default="1.3b")
    ap.add_argument("--res", default="480p")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ckpt-dir", default=None)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: parity, cost")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    directory = a.ckpt_dir or tempfile.mkdtemp(prefix="bench_uni3c_")
    out = {"device": a.device, "gpus": a.gpus, "model": a.model, "res": a.res, "frames": a.frames}
    if a.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    skip = set(filter(None, a.skip.split(",")))
    if "parity" not in skip:
        out["parity"] = parity(a.device, a.gpus, directory)
        print(json.dumps(out["parity"]), flush=True)
    if "cost" not in skip:
        out["cost"] = cost(a.device, a.gpus, a.model, a.res, a.frames, a.reps, directory)
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
