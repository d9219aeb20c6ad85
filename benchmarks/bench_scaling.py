"""Multi-GPU scaling and NCCL parity of the worker group (issue 6).

    python3 benchmarks/bench_scaling.py --model 14b --res 720p --gpus 1,2,4,8
    python3 benchmarks/bench_scaling.py --model 1.3b --res 480p --gpus 1,2,4,8

For each GPU count N (up to the visible GPUs) and each layout that N and the head count allow
(Ulysses-only, ring-only, hybrid Ulysses x ring, CFG 2 x Ulysses, and `auto`), a real torchrun
worker group (NCCL) loads a random-weight checkpoint of the real shape. It runs a batch of 2
(cond + uncond, as ComfyUI sends them with CFG), and reports:
  - forward time: median of --reps after a warm-up, owner-side;
  - per-GPU peak memory: the largest rank's;
  - the 50-step CFG total extrapolated from that time (transformer only);
  - parity: the bf16 output against the 1-GPU output, at a size whose token count divides by no
    N (9 x 30 x 53 = 14,310 tokens). The bar is 1e-2 relative.
The results go to $OUT/bench_scaling.json (or ./bench_scaling.json), and a Markdown table is
printed for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import SHAPES, latent_shape  # noqa: E402

from comfyui_xdit_usp.parallel import WorkerGroup, XDitUSPConfig, tiny  # noqa: E402
from comfyui_xdit_usp.parallel.protocol import ForwardInputs  # noqa: E402
from comfyui_xdit_usp.wan_to_xdit_mapping import to_original  # noqa: E402

OFFICIAL_14B_720P = {1: 1837.9, 2: 945.1, 4: 497.0, 8: 287.9}  # Wan2.1 USP, whole generation, s
PARITY_LATENT = (16, 9, 60, 106)  # 33 frames x 480 x 848 -> 9 x 30 x 53 = 14,310 tokens


def layouts_for(n: int, heads: int) -> dict[str, tuple[int, int, int]]:
    """name -> (ulysses, ring, cfg) for the layouts N GPUs and `heads` allow; (0, 0, 0) = auto."""
    out = {"auto": (0, 0, 0)}
    if n == 1:
        return out
    if heads % n == 0:
        out["ulysses"] = (n, 1, 1)
    out["ring"] = (1, n, 1)
    if n >= 4 and heads % (n // 2) == 0:
        out["hybrid"] = (n // 2, 2, 1)
    if heads % (n // 2) == 0:
        out["cfg2xulysses"] = (n // 2, 1, 2)
    return out


def write_checkpoint(model_name: str, directory: str) -> str:
    """Random bf16 weights of the real shape, saved in the original Wan layout (done once)."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    path = os.path.join(directory, f"wan_{model_name}_random_bf16.safetensors")
    if os.path.exists(path):
        return path
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        m = WanTransformer3DModel(**SHAPES[model_name])
    g = torch.Generator(device=next(m.parameters()).device).manual_seed(0)
    sd = {}
    for name, p in m.named_parameters():
        sd[name] = (torch.randn(p.shape, device=p.device, generator=g) * 0.02).to(torch.bfloat16).cpu()
        p.data = torch.empty(0)
    del m
    save_file(to_original(sd), path)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="14b", choices=sorted(SHAPES))
    ap.add_argument("--res", default="720p", choices=("480p", "720p"))
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument("--layouts", default="", help="comma list to restrict (auto,ulysses,ring,hybrid,cfg2xulysses)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ckpt-dir", default=tempfile.gettempdir())
    a = ap.parse_args()
    visible = torch.cuda.device_count()
    heads = SHAPES[a.model]["num_attention_heads"]
    path = write_checkpoint(a.model, a.ckpt_dir)
    c, f, h, w = latent_shape(a.res)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, c, f, h, w, generator=g)
    t = torch.tensor([700.0, 700.0])
    ctx = torch.randn(2, 512, 4096, generator=g)
    px = torch.randn(2, *PARITY_LATENT, generator=g)
    results = {"device": torch.cuda.get_device_name() if visible else "cpu", "visible_gpus": visible,
               "model": a.model, "res": a.res, "date": time.strftime("%Y-%m-%d"), "runs": []}
    reference = None
    out_path = os.path.join(os.environ.get("OUT", "."), "bench_scaling.json")
    for n in [int(v) for v in a.gpus.split(",")]:
        if n > visible:
            results["runs"].append({"gpus": n, "skipped": f"only {visible} GPU(s) visible"})
            continue
        for name, (u, r, cfg) in layouts_for(n, heads).items():
            if a.layouts and name not in a.layouts.split(","):
                continue
            config = XDitUSPConfig(world_size=n, ulysses_degree=u, ring_degree=r, cfg_degree=cfg,
                                       device="cuda", dtype="bf16")
            row = {"gpus": n, "layout_name": name}
            try:
                with WorkerGroup(config) as group:
                    t0 = time.perf_counter()
                    info = group.load("m", path)
                    row.update(load_s=time.perf_counter() - t0, backend=info.backend)
                    stats, times = {}, []
                    group.forward("m", ForwardInputs(x, t, ctx), stats=stats)
                    for _ in range(a.reps):
                        group.forward("m", ForwardInputs(x, t, ctx), stats=stats)
                        times.append(stats["owner_ms"] / 1e3)
                    times.sort()
                    row.update(layout=str(stats["layout"]), forward_b2_s=times[len(times) // 2],
                               peak_gb=max(stats["peak_bytes"]) / 2**30)
                    row["cfg50_total_s"] = 50 * row["forward_b2_s"]
                    out = group.forward("m", ForwardInputs(px, t, ctx)).float()
                    if reference is None and n == 1:
                        reference = out
                    if reference is not None:
                        row["parity_rel_err_vs_1gpu"] = tiny.rel_err(out, reference)
            except Exception as e:  # noqa: BLE001 - a layout that fails is a result to report
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            with open(out_path, "w") as fh:
                json.dump(results, fh, indent=1)
    base = next((r["forward_b2_s"] for r in results["runs"] if r.get("gpus") == 1 and "forward_b2_s" in r), None)
    print("\n| GPUs | layout | forward (batch 2) | speed-up | efficiency | peak GB/GPU | 50-step CFG | parity |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        if "forward_b2_s" not in r:
            continue
        sp = base / r["forward_b2_s"] if base else float("nan")
        print(f"| {r['gpus']} | {r['layout']} ({r['layout_name']}) | {r['forward_b2_s']:.2f} s | {sp:.2f}x | "
              f"{100 * sp / r['gpus']:.0f}% | {r['peak_gb']:.1f} | {r['cfg50_total_s']:.0f} s | "
              f"{r.get('parity_rel_err_vs_1gpu', float('nan')):.1e} |")


if __name__ == "__main__":
    main()
