"""Per-GPU memory and speed of weight sharding and fp8 weights (issue 11).

    python3 benchmarks/bench_memory.py --model 14b --res 720p \
        --runs 1:none:default,2:none:default,2:fsdp:default,2:fsdp:fp8_e4m3fn [--p2p-off]

Each run is GPUS:SHARDING:WEIGHT_DTYPE. For each, a real torchrun worker group (NCCL, bf16 compute,
the automatic layout: CFG 2 on 2 GPUs) loads a random-weight checkpoint of the real shape and runs
a batch of 2 (cond + uncond, as ComfyUI sends them). Reported per run:
  - peak_gb: the largest rank's torch.cuda.max_memory_allocated during a forward (weights included);
  - param_gb: the largest rank's parameter bytes between forwards; the model's total as held;
  - plan_gb: the owner's memory-plan estimate of the peak (parallel/memory.py), when available;
  - forward_b2_s: median owner-side forward time of --reps after a warm-up;
  - rel_err_vs_first: the output against the first run's (same inputs): 0 when only the placement
    differs, the fp8 rounding when the weights are fp8.
--p2p-off starts the workers with NCCL_P2P_DISABLE=1: collectives go through host memory, as on
PCIe cards without peer-to-peer. Results go to $OUT/bench_memory_<model>_<res>[_p2poff].json after
every run; a Markdown table is printed at the end.
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
from _common import latent_shape  # noqa: E402
from bench_scaling import write_checkpoint  # noqa: E402

from comfyui_xdit_usp.parallel import WorkerGroup, XDitUSPConfig, tiny  # noqa: E402
from comfyui_xdit_usp.parallel.protocol import ForwardInputs  # noqa: E402

GB = 2**30  # GiB, as torch.cuda figures and the rest of BENCHMARKS.md


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="14b", choices=("1.3b", "14b"))
    ap.add_argument("--res", default="720p", choices=("480p", "720p"))
    ap.add_argument("--runs", default="1:none:default,2:none:default,2:fsdp:default")
    ap.add_argument("--p2p-off", action="store_true")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--ckpt-dir", default=tempfile.gettempdir())
    a = ap.parse_args()
    visible = torch.cuda.device_count()
    path = write_checkpoint(a.model, a.ckpt_dir)
    c, f, h, w = latent_shape(a.res)
    g = torch.Generator().manual_seed(1)
    inputs = ForwardInputs(torch.randn(2, c, f, h, w, generator=g), torch.tensor([700.0, 700.0]),
                           torch.randn(2, 512, 4096, generator=g))
    env = {"NCCL_P2P_DISABLE": "1"} if a.p2p_off else {}
    results = {"device": torch.cuda.get_device_name() if visible else "cpu", "visible_gpus": visible,
               "torch": torch.__version__, "model": a.model, "res": a.res, "p2p_off": a.p2p_off,
               "date": time.strftime("%Y-%m-%d"), "runs": []}
    name = f"bench_memory_{a.model}_{a.res}{'_p2poff' if a.p2p_off else ''}.json"
    out_path = os.path.join(os.environ.get("OUT", "."), name)
    first = None
    for spec in a.runs.split(","):
        n, shard, weight_dtype = spec.split(":")
        n = int(n)
        row = {"gpus": n, "shard": shard, "weight_dtype": weight_dtype}
        if n > visible:
            row["skipped"] = f"only {visible} GPU(s) visible"
        else:
            config = XDitUSPConfig(world_size=n, device="cuda", dtype="bf16", weight_sharding=shard,
                                   weight_dtype=weight_dtype, extra_env=env)
            try:
                with WorkerGroup(config) as group:
                    t0 = time.perf_counter()
                    info = group.load("m", path, latent=(f, h, w), batch=2)
                    row.update(load_s=time.perf_counter() - t0, placement=info.placement,
                               param_gb=info.param_bytes / GB, param_total_gb=info.param_bytes_total / GB,
                               plan=info.memory_plan)
                    stats, times = {}, []
                    out = group.forward("m", inputs, stats=stats).float()
                    for _ in range(a.reps):
                        group.forward("m", inputs, stats=stats)
                        times.append(stats["owner_ms"] / 1e3)
                    times.sort()
                    row.update(layout=str(stats["layout"]), forward_b2_s=times[len(times) // 2],
                               peak_gb=max(stats["peak_bytes"]) / GB)
                    if first is None:
                        first = out
                    row["rel_err_vs_first"] = tiny.rel_err(out, first)
            except Exception as e:  # noqa: BLE001 - a run that fails (e.g. out of memory) is a result
                row["error"] = f"{type(e).__name__}: {e}"[:800]
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        with open(out_path, "w") as fh:
            json.dump(results, fh, indent=1)
    print(f"\n{results['device']}, {a.model} {a.res}x81, batch 2, bf16 compute"
          f"{', NCCL_P2P_DISABLE=1' if a.p2p_off else ''}")
    print("| GPUs | weights | weight dtype | layout | params GB/GPU (total) | peak GB/GPU | plan GB | forward | rel err vs first |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        if "forward_b2_s" not in r:
            print(f"| {r['gpus']} | {r['shard']} | {r['weight_dtype']} | {r.get('skipped') or r.get('error', '')[:120]} |")
            continue
        plan = r["plan"]["peak_bytes"] / GB if r.get("plan") else float("nan")
        print(f"| {r['gpus']} | {r['placement']} | {r['weight_dtype']} | {r['layout']} | {r['param_gb']:.1f} "
              f"({r['param_total_gb']:.1f}) | {r['peak_gb']:.1f} | {plan:.1f} | {r['forward_b2_s']:.2f} s | "
              f"{r['rel_err_vs_first']:.1e} |")


if __name__ == "__main__":
    main()
