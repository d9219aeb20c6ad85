"""The parallel Wan VAE decode against one-GPU decoding (issue 16): seconds and per-GPU peak memory.

    python3 benchmarks/bench_vae.py --vae wan2.1 --res 480p,720p --gpus 1,2            # the BENCHMARKS.md table
    python3 benchmarks/bench_vae.py --vae wan2.2 --res 720p --gpus 1,2,4
    python3 benchmarks/bench_vae.py --vae wan2.1 --res tiny --device cpu --gpus 1,2    # CPU dry run
    python3 benchmarks/bench_vae.py --res 720p --gpus 2 --schedules 'full1;comfy;diffusers'  # decode schedules

Random weights at the real size (Wan 2.1 VAE: base_dim 96, z 16; Wan 2.2: 160 / decoder 256, z 48,
parallel/tiny.real_vae_config), a random latent of --frames (81) video frames at each --res, in
--dtype (bf16). First the one-GPU baselines of every resolution, in this process on GPU 0, before any
worker starts:
  - with --comfy (ComfyUI from COMFYUI_DIR or the .comfy bundle, booted as bench_comfyui.py does):
    ComfyUI's own VAEDecode and VAEDecodeTiled nodes (its defaults) on the VAE comfy.sd.VAE builds
    from the same weights, as VAELoader does (ComfyUI picks its dtype; its peak includes its
    weights). VAEDecode is then the baseline and the reference output. ComfyUI's VAE wrapper only
    recognises the real 2.2 VAE width, so --res tiny --vae wan2.2 --comfy fails there;
  - `native` (skipped by --no-diffusers): one-GPU decode of the whole latent with diffusers'
    AutoencoderKLWan, latent in and video out to the CPU as VAEDecode does; `tiled` (without
    --comfy): the same with diffusers' tiled decode (256 px tiles, 192 px stride; not exact).
Then for each N in --gpus one worker group of N ranks (NCCL) decodes every resolution split by rows
(`ours`), by default as XDit+USP VAE Decode does: the ranks make ComfyUI's IMAGE ([frames, H, W, 3]
in [0, 1], fp32) and write it into shared memory as the frames come (--layout video: the video in
[-1, 1] instead). Owner-side seconds (latent into the arena, decode, IMAGE out of it) and in-worker
seconds, median of --reps after a warm-up; per-GPU peak = torch.cuda.max_memory_allocated on every
rank (weights included) against the baseline's in this process (weights included); rel_l2 against
the reference output (bf16: both round; fp32 agrees to ~1e-6).
Every row is written to $OUT/bench_vae_<vae>[_<tag>].json as it is measured (a run stopped by its
time limit keeps its rows); a Markdown table is printed at the end.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESOLUTIONS  # noqa: E402

from comfyui_xdit_usp.parallel import WorkerGroup, XDitUSPConfig, tiny  # noqa: E402
from comfyui_xdit_usp.parallel.sp_vae import DECODE_SCHEDULE, TORCH_DTYPES  # noqa: E402

GB = 2**30


def timed(fn, reps: int, cuda: bool) -> tuple[float, object]:
    """(median seconds of `reps` calls after one warm-up, the last result)."""
    out = fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def single_gpu(vae, z, device, dtype, reps, tiled=False):
    """One-device decode of the whole latent, as VAEDecode: latent in, video out to the CPU."""
    cuda = device.type == "cuda"
    if tiled:
        vae.enable_tiling()
    else:
        vae.disable_tiling()

    def run():
        with torch.no_grad():
            # as ComfyUI's VAE.decode: .to(output_device, dtype=intermediate dtype, copy=True)
            return vae.decode(z.to(device, dtype), return_dict=False)[0].to("cpu", torch.float32)

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    s, out = timed(run, reps, cuda)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    vae.disable_tiling()
    return s, peak, out


def comfy_nodes(device):
    """ComfyUI's `nodes` module (booted as bench_comfyui.py boots it: COMFYUI_DIR or the .comfy
    bundle, PyAV stubbed), or None when there is no ComfyUI to import."""
    import bench_comfyui as BC

    try:
        directory = BC.comfy_dir(None)
    except SystemExit as e:
        print(f"# --comfy: {e}; skipped", flush=True)
        return None
    BC._stub_av()
    return BC.boot(directory, cpu=device.type == "cpu")


def comfy_decode(nodes, state, z, device, reps, tiled: bool):
    """ComfyUI's own VAEDecode (or VAEDecodeTiled with its defaults: 512 px tiles, 64 px overlap,
    64 frames, 8 overlap) on the VAE built from `state` by comfy.sd.VAE, as VAELoader does: its own
    dtype choice, memory management and output layout ([frames, H, W, 3] in [0, 1], on the CPU)."""
    import comfy.model_management as mm
    import comfy.sd

    vae = comfy.sd.VAE(sd=state)
    samples = {"samples": z}
    cuda = device.type == "cuda"
    node = nodes.VAEDecodeTiled() if tiled else nodes.VAEDecode()

    def run():  # under inference mode, as ComfyUI's executor runs nodes
        with torch.inference_mode():
            if tiled:
                return node.decode(vae, samples, tile_size=512, overlap=64, temporal_size=64, temporal_overlap=8)[0]
            return node.decode(vae, samples)[0]

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    s, out = timed(run, reps, cuda)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    dtype = str(vae.vae_dtype).replace("torch.", "")
    mm.unload_all_models()
    mm.soft_empty_cache()
    # back to the workers' layout: [1, 3, frames, H, W] in [-1, 1]
    return s, peak, out.clone().movedim(-1, 0).unsqueeze(0).float() * 2 - 1, dtype


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", default="wan2.1", choices=("wan2.1", "wan2.2"))
    p.add_argument("--res", default="480p,720p", help="comma list of " + ", ".join(RESOLUTIONS))
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--gpus", default="1,2", help="comma list of worker counts")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--no-tiled", action="store_true", help="skip the tiled one-GPU baselines")
    p.add_argument("--no-diffusers", action="store_true",
                   help="with --comfy: skip diffusers' one-GPU decodes (ComfyUI's VAEDecode is the reference)")
    p.add_argument("--layout", default="image", choices=("image", "video"),
                   help="what ours returns: ComfyUI's IMAGE made on the ranks (the node's path), or the video in [-1, 1]")
    p.add_argument("--schedules", default="",
                   help="decode schedules to time ours with, ';'-separated (sp_vae.DECODE_SCHEDULES names or "
                        "frames per piece after each up block, e.g. 'full1;comfy;0,0,2'); default: the default schedule")
    p.add_argument("--tag", default="", help="suffix of the results file name")
    p.add_argument("--comfy", action="store_true",
                   help="also time ComfyUI's own VAEDecode and VAEDecodeTiled nodes (COMFYUI_DIR or the .comfy bundle)")
    a = p.parse_args()
    version = a.vae.removeprefix("wan")
    dtype_name = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    dtype = TORCH_DTYPES[dtype_name]
    cuda = a.device == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    nodes = comfy_nodes(device) if a.comfy else None
    real = all(r != "tiny" for r in a.res.split(","))
    config = tiny.real_vae_config(version) if real else tiny.tiny_vae_config(version)
    vae = tiny.build_vae(version, seed=0, config=config)
    state = tiny.vae_comfy_state_dict(vae, version)  # what ComfyUI's VAE object holds
    vae = vae.to(device, dtype).eval()
    s = 16 if version == "2.2" else 8

    results = {"device": torch.cuda.get_device_name() if cuda else "cpu",
               "visible_gpus": torch.cuda.device_count() if cuda else 0, "date": time.strftime("%Y-%m-%d"),
               "command": "python3 " + " ".join(sys.argv), "vae": a.vae, "dtype": dtype_name,
               "param_bytes": sum(t.numel() * t.element_size() for t in vae.parameters()), "runs": []}
    out_path = os.path.join(os.environ.get("OUT", "."), f"bench_vae_{a.vae}{'_' + a.tag if a.tag else ''}.json")
    resolutions = a.res.split(",")
    zs, refs, natives = {}, {}, {}
    for res in resolutions:
        h, w = RESOLUTIONS[res]
        zs[res] = torch.randn(1, config["z_dim"], (a.frames - 1) // 4 + 1, h // s, w // s,
                              generator=torch.Generator().manual_seed(0))

    def emit(res, row):
        row.update(res=res, frames=a.frames, latent=list(zs[res].shape[2:]))
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        with open(out_path, "w") as fh:  # after every row: a run stopped by its time limit keeps what it measured
            json.dump(results, fh, indent=1)

    # one-GPU baselines, every resolution (ComfyUI's own first: the comparison the targets are against)
    for res in resolutions:
        z, rows = zs[res], []
        if nodes is not None:
            for tiled in (False, True) if not a.no_tiled else (False,):
                r = comfy_decode(nodes, state, z, device, a.reps, tiled)
                rows.append({"what": "VAEDecodeTiled" if tiled else "VAEDecode", "gpus": 1, "s": round(r[0], 3),
                             "peak_gb": r[1] and round(r[1] / GB, 2), "comfy_dtype": r[3]})
                if not tiled:
                    refs[res] = r[2]
                else:
                    rows[-1]["rel_l2_vs_VAEDecode"] = tiny.rel_l2(r[2], refs[res])
                emit(res, rows[-1])
        if not a.no_diffusers or nodes is None:
            sec, peak, out = single_gpu(vae, z, device, dtype, a.reps)
            rows.append({"what": "native", "gpus": 1, "s": round(sec, 3), "peak_gb": peak and round(peak / GB, 2)})
            if res in refs:
                rows[-1]["rel_l2_vs_VAEDecode"] = tiny.rel_l2(out, refs[res])
            refs.setdefault(res, out)
            emit(res, rows[-1])
            if not a.no_tiled and nodes is None:  # with --comfy, VAEDecodeTiled is the tiled baseline
                sec, peak, out = single_gpu(vae, z, device, dtype, a.reps, tiled=True)
                emit(res, {"what": "tiled", "gpus": 1, "s": round(sec, 3), "peak_gb": peak and round(peak / GB, 2),
                           "rel_l2_vs_VAEDecode" if nodes is not None else "rel_l2_vs_native":
                               tiny.rel_l2(out, refs[res])})
            del out
        natives[res] = rows[0]  # ComfyUI's VAEDecode when measured, else diffusers' decode
    vae.cpu()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    # ours: one worker group per N, every resolution (the IMAGE the node returns, made on the ranks)
    for n in [int(x) for x in a.gpus.split(",")]:
        if cuda and n > torch.cuda.device_count():
            print(f"# {n} GPUs: only {torch.cuda.device_count()} visible; skipped", flush=True)
            continue
        cfg = XDitUSPConfig(world_size=n, device=a.device, dtype=dtype_name, launch_timeout_s=600,
                            forward_timeout_s=1800)
        with WorkerGroup(cfg) as group:
            t0 = time.perf_counter()
            key = group.vae_load(state, dtype_name)
            load_s = time.perf_counter() - t0
            for res, schedule in [(r, sc) for r in resolutions for sc in a.schedules.split(";")]:
                z, image = zs[res], a.layout == "image"
                stats = {}
                group.vae_decode(key, z, stats=stats, image=image, schedule=schedule)  # warm-up
                owner, worker = [], []
                for _ in range(a.reps):
                    out = group.vae_decode(key, z, stats=stats, image=image, schedule=schedule)
                    owner.append(stats["owner_ms"] / 1e3)
                    worker.append(stats["worker_ms"] / 1e3)
                if image:  # back to the video layout of the references: [1, 3, frames, H, W] in [-1, 1]
                    out = out.movedim(-1, 0).unsqueeze(0) * 2 - 1
                peaks, native = stats["peak_bytes"], natives[res]
                row = {"what": "ours", "gpus": n, "schedule": schedule or DECODE_SCHEDULE,
                       "schedule_run": "/".join(dict.fromkeys(stats["schedule"])), "layout": a.layout,
                       "s": round(statistics.median(owner), 3),
                       "worker_s": round(statistics.median(worker), 3), "load_s": round(load_s, 2),
                       "peak_gb_per_gpu": None if None in peaks else [round(b / GB, 2) for b in peaks],
                       "rows_per_rank": [b - a_ for a_, b in stats["rows"]],
                       "baseline": native["what"], f"rel_l2_vs_{native['what']}": tiny.rel_l2(out, refs[res]),
                       "speedup_vs_baseline": round(native["s"] / statistics.median(owner), 2)}
                if native["peak_gb"] and row["peak_gb_per_gpu"]:
                    row["peak_ratio_vs_baseline"] = round(max(row["peak_gb_per_gpu"]) / native["peak_gb"], 3)
                del out
                emit(res, row)

    print(f"\n{results['device']}, Wan {version} VAE ({dtype_name}), {a.frames} frames, {results['date']}")
    print("| res | decode | GPUs | s | peak GB per GPU | vs baseline | rel_l2 vs baseline |")
    print("|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        peak = r.get("peak_gb") or (max(r["peak_gb_per_gpu"]) if r.get("peak_gb_per_gpu") else None)
        vs = (f"{r['speedup_vs_baseline']}x, peak {r.get('peak_ratio_vs_baseline', '-')} of {r['baseline']}"
              if r["what"] == "ours" else "")
        what = r["what"]
        if what == "ours":
            what += f" ({r['schedule']}" + (f": {r['schedule_run']})" if r["schedule_run"] != r["schedule"] else ")")
        print(f"| {r['res']} | {what} | {r['gpus']} | {r['s']} | {peak if peak is not None else '-'} | {vs} | "
              f"{next((v for k, v in r.items() if k.startswith('rel_l2')), 0.0):.1e} |")


if __name__ == "__main__":
    main()
