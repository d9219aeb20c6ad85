"""Multi-GPU scaling, memory and parity of the worker group (issues 6, 13, 18).

    python3 benchmarks/bench_scaling.py --model 14b --res 720p --gpus 1,2,4,8
    python3 benchmarks/bench_scaling.py --model 1.3b --res 480p --gpus 1,4 --shard none,fsdp --p2p-off
    python3 benchmarks/bench_scaling.py --model 1.3b --res 480p --gpus 2 --layouts ulysses,cfg2xulysses,tp2,pp2 \
        --shard none,fsdp --fsdp-layouts ulysses      # issue 15: tensor / pipeline parallel beside them
    python3 benchmarks/bench_scaling.py --model tiny --res tiny --device cpu --gpus 1,2,4   # CPU dry run

For each GPU count N (up to the visible GPUs), each layout that N and the head count allow
(Ulysses-only, ring-only, hybrid Ulysses x ring, CFG 2 x Ulysses, CFG 2 x ring at 4, CFG 2 x
hybrid at 8, and `auto`) and each weight
placement in --shard, a real torchrun worker group (NCCL; gloo with --device cpu) loads a
random-weight checkpoint of the real shape and reports:
  - forward time at each batch in --batches (2 = cond + uncond, as ComfyUI sends them with CFG;
    1 = cfg 1, where only the sequence split helps): median of --reps after a warm-up, owner-side,
    with the layout the workers used for that batch;
  - per-GPU peak memory (torch.cuda.max_memory_allocated, every rank) and parameter bytes per rank;
  - the 50-step CFG total (50 x the batch-2 forward, transformer only), next to Wan2.1's official
    whole-generation time for 14B 720p;
  - parity against an fp32 reference (issue 13's metric): a plain single-process diffusers forward
    in fp32, TF32 off, of the same weights at a size whose token count divides by no N
    (9 x 30 x 53 = 14,310 tokens). `rel_l2` is ||out - ref|| / ||ref|| of this run's bf16 output;
    `parity_ratio` divides it by the 1-GPU bf16 run's: the bar is <= 1.5 (the N-GPU run rounds no
    worse than one GPU). The max-abs ratio against the 1-GPU output is kept as `rel_err_vs_1gpu`.
    The reference is computed once (on GPU 0 before any group starts) and cached next to the
    checkpoint, so a second invocation on the same machine reuses it.
--options runs each layout once per speed option (issue 14): eager, compile (torch.compile of the
blocks' per-token work), fp8 (fp8 matmuls), sage (SageAttention), or several joined by +; issue 13's
nooverlap / overlap (the blocking / the overlapped exchange; without either, `comm_overlap` "auto"
chooses by the link probe) and fp8wire (the fp8 wire; its rel_l2_vs_eager is the
error against the exact wire of the same layout). Each row also records the group's link probe
and how `auto` chose (`link`, `layout_choice`). Each
row then also reports the warm-up forward's time (`first_s`: compilation included) and
`rel_l2_vs_eager`, its output against the eager run's of the same layout and GPU count (what an
inexact option costs; list eager first).
--p2p-off starts the workers with NCCL_P2P_DISABLE=1 (collectives through host memory, as on PCIe
cards without peer-to-peer). Results go to $OUT/bench_scaling_<model>_<res>[_p2poff][_TAG].json after
every run; a Markdown table is printed at the end.
"""
from __future__ import annotations

import argparse
import itertools
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
from comfyui_xdit_usp.wan_to_xdit_mapping import inspect_checkpoint, to_original  # noqa: E402

OFFICIAL_14B_720P = {1: 1837.9, 2: 945.1, 4: 497.0, 8: 287.9}  # Wan2.1 USP, whole generation, s
PARITY_LATENT = (16, 9, 60, 106)  # 33 frames x 480 x 848 -> 9 x 30 x 53 = 14,310 tokens
TINY_PARITY_LATENT = (16, 3, 14, 18)  # 3 x 7 x 9 = 189 tokens: divides by no N in 2..8
GB = 2**30  # GiB, as torch.cuda figures and the rest of BENCHMARKS.md


def layouts_for(n: int, heads: int) -> dict[str, tuple[int, ...]]:
    """name -> (ulysses, ring, cfg[, tensor, pipeline]) for the layouts N GPUs and `heads` allow;
    (0, 0, 0) = auto. Tensor and pipeline parallel (issue 15): tp{n}, pp{n}, and at 4 GPUs their
    compositions tp2xpp2, cfg2xtp2, cfg2xpp2, tp2xulysses2."""
    out = {"auto": (0, 0, 0)}
    if n == 1:
        return out
    if heads % n == 0:
        out[f"tp{n}"] = (1, 1, 1, n, 1)
    out[f"pp{n}"] = (1, 1, 1, 1, n)
    if n == 4:
        out["tp2xpp2"] = (1, 1, 1, 2, 2)
        out["cfg2xtp2"] = (1, 1, 2, 2, 1)
        out["cfg2xpp2"] = (1, 1, 2, 1, 2)
        if heads % 4 == 0:
            out["tp2xulysses2"] = (2, 1, 1, 2, 1)
    if heads % n == 0:
        out["ulysses"] = (n, 1, 1)
    out["ring"] = (1, n, 1)
    if n >= 4 and heads % (n // 2) == 0:
        out["hybrid"] = (n // 2, 2, 1)
    if heads % (n // 2) == 0:
        out["cfg2xulysses"] = (n // 2, 1, 2)
    if n == 4:
        out["cfg2xring"] = (1, 2, 2)
    if n >= 8 and heads % (n // 4) == 0:
        out["cfg2xhybrid"] = (n // 4, 2, 2)
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
    save_file(to_original(sd), path + ".part")
    os.replace(path + ".part", path)  # a run killed while writing leaves no truncated file behind
    return path


def fp32_reference(path: str, inputs: ForwardInputs, device: str) -> torch.Tensor:
    """The fp32 single-process reference of `inputs` (cached beside the checkpoint)."""
    cache = f"{path}.ref_{'x'.join(map(str, inputs.hidden_states.shape))}.pt"
    if os.path.exists(cache):
        return torch.load(cache)
    t0 = time.perf_counter()
    ref = tiny.reference_from_checkpoint(path, inspect_checkpoint(path), inputs, device=device, batch_chunk=1)
    torch.save(ref, cache)
    print(f"fp32 reference computed on {device} in {time.perf_counter() - t0:.0f} s", flush=True)
    return ref


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="14b", choices=sorted(SHAPES))
    ap.add_argument("--res", default="720p", choices=("480p", "720p", "tiny"))
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument("--layouts", default="",
                    help="comma list to restrict (auto,ulysses,ring,hybrid,cfg2xulysses,cfg2xring,cfg2xhybrid; tensor / "
                         "pipeline parallel: tp2,pp2 at 2 GPUs, tp4,pp4,tp2xpp2,cfg2xtp2,cfg2xpp2,tp2xulysses2 at 4)")
    ap.add_argument("--shard", default="none", help="comma list of weight placements: none,fsdp")
    ap.add_argument("--fsdp-layouts", default="",
                    help="comma list: run fsdp only for these layouts (default: every layout)")
    ap.add_argument("--batches", default="2,1", help="comma list of batch sizes timed per run")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--p2p-off", action="store_true", help="NCCL_P2P_DISABLE=1 in the workers")
    ap.add_argument("--no-parity", action="store_true", help="skip the fp32 reference and parity forwards")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--options", default="eager",
                    help="comma list of speed options per layout: eager, compile, fp8 (fp8 matmuls), fp8w (fp8 "
                         "weights upcast per layer, for comparison), sage (SageAttention), nooverlap / overlap (the "
                         "blocking / overlapped exchange; default: chosen by the link), fp8wire (q/k/v and the output sent as fp8), joined by + "
                         "(e.g. eager,compile,compile+fp8,compile+sage,nooverlap,fp8wire)")
    ap.add_argument("--sample-steps", type=int, default=0,
                    help="also sample this many Euler steps (batch 1, cfg 1, shift 5) from fixed noise at the timed "
                         "size and report the final latent's rel L2 against the eager run's (sampled_rel_l2_vs_eager)")
    ap.add_argument("--runs", default="",
                    help="instead of the --gpus x --layouts x --options product, these runs: GPUS:LAYOUT:OPTIONS:BATCHES "
                         "separated by ';' or spaces, options alternatives by '/', batches by '+' (e.g. "
                         "'1:auto:eager:2+1;2:ulysses:eager/nooverlap/fp8wire:1'); weights none")
    ap.add_argument("--baseline", default="",
                    help="a results file of an earlier invocation (same machine) whose 1-GPU eager run gives the "
                         "speed-ups and parity ratios of this one's (e.g. the --p2p-off half of a run)")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    ap.add_argument("--ckpt-dir", default=tempfile.gettempdir())
    a = ap.parse_args()
    cuda = a.device == "cuda"
    visible = torch.cuda.device_count() if cuda else 8
    heads = SHAPES[a.model]["num_attention_heads"]
    text_dim = SHAPES[a.model]["text_dim"]
    path = write_checkpoint(a.model, a.ckpt_dir)
    c, f, h, w = latent_shape(a.res)
    batches = [int(b) for b in a.batches.split(",")]
    if a.runs:
        batches = sorted({int(b) for item in a.runs.replace(";", " ").split() for b in item.split(":")[3].split("+")},
                         reverse=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(max(batches), c, f, h, w, generator=g)
    ctx = torch.randn(max(batches), 512, text_dim, generator=g)
    inputs = {b: ForwardInputs(x[:b], torch.full((b,), 700.0), ctx[:b]) for b in batches}
    parity_in = ForwardInputs(torch.randn(2, *(TINY_PARITY_LATENT if a.model == "tiny" else PARITY_LATENT),
                                          generator=g), torch.tensor([700.0, 300.0]), ctx[:1].repeat(2, 1, 1))
    ref = None if a.no_parity else fp32_reference(path, parity_in, "cuda" if cuda else "cpu")
    env = {"NCCL_P2P_DISABLE": "1"} if a.p2p_off else {}
    results = {"device": torch.cuda.get_device_name() if cuda and visible else "cpu", "visible_gpus": visible,
               "torch": torch.__version__, "model": a.model, "res": a.res, "latent": [c, f, h, w],
               "p2p_off": a.p2p_off, "date": time.strftime("%Y-%m-%d"),
               "command": "python3 " + " ".join(sys.argv), "runs": []}
    name = f"bench_scaling_{a.model}_{a.res}{'_p2poff' if a.p2p_off else ''}{'_' + a.tag if a.tag else ''}.json"
    out_path = os.path.join(os.environ.get("OUT", "."), name)
    one_gpu = {}  # the 1-GPU run's parity output and error: the floor every N is held to
    if a.baseline:
        with open(a.baseline) as fh:
            base_row = next(r for r in json.load(fh)["runs"] if r["gpus"] == 1 and r.get("options") == "eager"
                            and "error" not in r and "skipped" not in r)
        results["baseline"] = {"file": a.baseline, **{k: base_row[k] for k in base_row if k in ("b1", "b2", "rel_l2")}}
        if "rel_l2" in base_row:
            one_gpu["rel_l2"] = base_row["rel_l2"]
    for n, lname, shard, opts, run_batches in plan_runs(a, heads, batches):
        u, r, cfg, *split = layouts_for(n, heads)[lname]
        tp, pp = split or (1, 1)
        row = {"gpus": n, "layout_name": lname, "shard": shard, "options": opts}
        if n > visible:
            row["skipped"] = f"only {visible} GPU(s) visible"
            results["runs"].append(row)
            continue
        flags = set(opts.split("+")) - {"eager"}
        if flags - {"compile", "fp8", "fp8w", "sage", "nooverlap", "overlap", "fp8wire"}:
            raise SystemExit(f"--options: unknown option in {opts!r}")
        config = XDitUSPConfig(world_size=n, ulysses_degree=u, ring_degree=r, cfg_degree=cfg,
                               tensor_parallel_degree=tp, pipeline_parallel_degree=pp, device=a.device, dtype="bf16", weight_sharding=shard, extra_env=env,
                               compile="compile" in flags, fp8_matmul="fp8" in flags,
                               weight_dtype="fp8_e4m3fn" if "fp8w" in flags else "default",
                               attention_backend="sage" if "sage" in flags else "auto",
                               comm_overlap="off" if "nooverlap" in flags else "on" if "overlap" in flags else "auto",
                               comm_dtype="fp8" if "fp8wire" in flags else "default")
        try:
            run_one(config, path, (f, h, w), {b: inputs[b] for b in run_batches}, parity_in, ref, a.reps, row,
                    one_gpu, a.sample_steps)
        except Exception as e:  # noqa: BLE001 - a layout that fails is a result to report
            row["error"] = f"{type(e).__name__}: {e}"[:800]
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        with open(out_path, "w") as fh:
            json.dump(results, fh, indent=1)
    print_table(results, batches)


def plan_runs(a, heads: int, batches: list[int]):
    """(gpus, layout name, weights, options, batches) of every run: --runs when given, else every
    --gpus x layout (--layouts) x --shard x --options, each timing --batches."""
    if a.runs:
        for item in a.runs.replace(";", " ").split():
            n, lname, opts, bs = item.split(":")
            if lname not in layouts_for(int(n), heads):
                raise SystemExit(f"--runs {item}: {int(n)} GPU(s) have no layout {lname!r}")
            for o in opts.split("/"):
                yield int(n), lname, "none", o, [int(b) for b in bs.split("+")]
        return
    for n in [int(v) for v in a.gpus.split(",")]:
        for lname in layouts_for(n, heads):
            if a.layouts and lname not in a.layouts.split(","):
                continue
            for shard, opts in itertools.product(a.shard.split(","), a.options.split(",")):
                split = layouts_for(n, heads)[lname][3:]
                if shard == "fsdp" and (n == 1 or any(d > 1 for d in split)
                                        or (a.fsdp_layouts and lname not in a.fsdp_layouts.split(","))):
                    continue  # (tensor / pipeline parallel already split the weights: fsdp with them is refused)
                yield n, lname, shard, opts, batches


def sample(group, inputs: ForwardInputs, steps: int, shift: float = 5.0) -> torch.Tensor:
    """`steps` Euler steps of Wan's flow matching (ComfyUI's "simple" schedule with shift, sigma
    from 1 to 0, timestep = 1000 * sigma) from inputs.hidden_states[:1] as the noise, text of
    row 0, no CFG: the latent a short sampling ends at, to see how an inexact option's error grows
    over steps."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    x = inputs.hidden_states[:1].double()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        step = ForwardInputs(x.float(), torch.tensor([1000.0 * float(s)]), inputs.encoder_hidden_states[:1])
        x = x + (s_next - s) * group.forward("m", step).double()
    return x.float()


def run_one(config, path, latent, inputs, parity_in, ref, reps, row, one_gpu, sample_steps=0):
    """One configuration: load, then per batch a warm-up forward (with compile: compilation, its
    time in first_s) and `reps` timed ones; then the parity forward against the fp32 reference, the
    1-GPU eager output (parity_ratio) and the eager output of the same layout and GPU count (rel_l2_vs_eager,
    the cost of an inexact option)."""
    with WorkerGroup(config) as group:
        t0 = time.perf_counter()
        info = group.load("m", path, latent=latent, batch=max(inputs))
        row.update(load_s=round(time.perf_counter() - t0, 2), backend=info.backend, placement=info.placement,
                   param_gb_per_rank=[round(b / GB, 3) for b in info.param_bytes_per_rank],
                   param_bytes_per_rank=info.param_bytes_per_rank, param_bytes_total=info.param_bytes_total,
                   link=info.link, layout_choice=info.layout_choice)
        for b, inp in sorted(inputs.items(), reverse=True):
            stats, times = {}, []
            t_first = time.perf_counter()
            group.forward("m", inp, stats=stats)  # warm-up
            first_s = time.perf_counter() - t_first
            for _ in range(reps):
                group.forward("m", inp, stats=stats)
                times.append(stats["owner_ms"] / 1e3)
            times.sort()
            peaks = stats["peak_bytes"]
            row[f"b{b}"] = {"layout": str(stats["layout"]), "forward_s": round(times[len(times) // 2], 4),
                            "first_s": round(first_s, 2),
                            "times_s": [round(t, 4) for t in times],
                            "peak_gb_per_rank": None if None in peaks else [round(p / GB, 3) for p in peaks]}
        if 2 in inputs:
            row["cfg50_total_s"] = round(50 * row["b2"]["forward_s"], 1)
        if ref is not None:
            out = group.forward("m", parity_in).float()
            row["rel_l2"] = tiny.rel_l2(out, ref)
            row["rel_err_max"] = tiny.rel_err(out, ref)
            eager = row["options"] == "eager"
            if config.world_size == 1 and eager and "out" not in one_gpu:
                one_gpu.update(out=out, rel_l2=row["rel_l2"])
            if "rel_l2" in one_gpu:
                row["parity_ratio"] = row["rel_l2"] / one_gpu["rel_l2"]
            if "out" in one_gpu:
                row["rel_err_vs_1gpu"] = tiny.rel_err(out, one_gpu["out"])
            if eager:
                one_gpu.setdefault("eager", {})[config.world_size, row["shard"], row["layout_name"]] = out
            base = one_gpu.get("eager", {}).get((config.world_size, row["shard"], row["layout_name"]))
            if base is not None:
                row["rel_l2_vs_eager"] = tiny.rel_l2(out, base)
        if sample_steps:
            t0 = time.perf_counter()
            x = sample(group, next(iter(inputs.values())), sample_steps)
            row["sample_s"] = round(time.perf_counter() - t0, 2)
            key = (config.world_size, row["shard"], row["layout_name"])
            if row["options"] == "eager":
                one_gpu.setdefault("sampled", {})[key] = x
            base = one_gpu.get("sampled", {}).get(key)
            if base is not None:
                row["sampled_rel_l2_vs_eager"] = tiny.rel_l2(x, base)


def print_table(results, batches):
    runs = [r for r in results["runs"] if "b2" in r or "b1" in r]
    earlier = results.get("baseline", {})
    base = {b: next((r[f"b{b}"]["forward_s"] for r in runs if r["gpus"] == 1 and f"b{b}" in r),
                    earlier.get(f"b{b}", {}).get("forward_s")) for b in batches}
    print(f"\n{results['device']} x{results['visible_gpus']}, {results['model']} {results['res']}x81, bf16"
          f"{', NCCL_P2P_DISABLE=1' if results['p2p_off'] else ''}, {results['date']}")
    cols = "".join(f" batch {b}: forward (layout) | speed-up |" for b in batches)
    print(f"| GPUs | layout | weights | options |{cols} peak GB/GPU | params GB/GPU | 50-step CFG | first step | rel L2 vs fp32 | "
          "ratio to 1 GPU | rel L2 vs eager |")
    print("|---|---|---|---|" + "---|---|" * len(batches) + "---|---|---|---|---|---|---|")
    for r in results["runs"]:
        if r not in runs:
            print(f"| {r['gpus']} | {r['layout_name']} | {r['shard']} | {r.get('options', 'eager')} | "
                  f"{r.get('skipped') or r.get('error', '')[:160]} |")
            continue
        cells = ""
        for b in batches:
            d = r.get(f"b{b}")
            if d is None:
                cells += " – | – |"
                continue
            sp = base[b] / d["forward_s"] if base[b] else float("nan")
            cells += f" {d['forward_s']:.3f} s ({d['layout']}) | {sp:.2f}x |"
        peaks = [max(r[f"b{b}"]["peak_gb_per_rank"] or [float("nan")]) for b in batches if f"b{b}" in r]
        first = max(r[f"b{b}"].get("first_s", float("nan")) for b in batches if f"b{b}" in r)
        print(f"| {r['gpus']} | {r['layout_name']} | {r.get('placement', r['shard'])} | {_options(r)} |"
              f"{cells} {max(peaks):.1f} | {max(r.get('param_gb_per_rank') or [float('nan')]):.2f} | "
              f"{r.get('cfg50_total_s', float('nan')):.0f} s | {first:.1f} s | "
              f"{r.get('rel_l2', float('nan')):.2e} | {r.get('parity_ratio', float('nan')):.2f} | "
              f"{r.get('rel_l2_vs_eager', float('nan')):.2e} |")
    link = next((r["link"] for r in runs if r["gpus"] > 1 and r.get("link")), None)
    if link:
        print(f"\nlink probe: {json.dumps(link)}")
    exact = {"eager", "overlap", "nooverlap"}  # the same math: the exchange is auto's to choose too
    for n in sorted({r["gpus"] for r in runs if r["gpus"] > 1}):
        for opts in sorted({"eager" if r["options"] in exact else r["options"] for r in runs}):
            family = exact if opts == "eager" else {opts}
            same = [r for r in runs if r["gpus"] == n and r["options"] in family and r["shard"] == "none"
                    and r.get("placement") != "split" and "error" not in r]  # tp / pp split weights: not auto's
            auto = next((r for r in same if r["layout_name"] == "auto" and r["options"] == opts), None)
            for b in batches:
                timed = [(r[f"b{b}"]["forward_s"], f"{r[f'b{b}']['layout']} {_options(r)}") for r in same if f"b{b}" in r]
                if auto and f"b{b}" in auto and len(timed) > 1:
                    best = min(timed)
                    mine = auto[f"b{b}"]["forward_s"]
                    print(f"{n} GPUs, {opts}, batch {b}: fastest {best[1]} {best[0]:.3f} s; auto chose "
                          f"{auto[f'b{b}']['layout']} {_options(auto)} {mine:.3f} s ({mine / best[0]:.3f}x the fastest)")
    if results["model"] == "14b" and results["res"] == "720p":
        print("\nWan2.1 official, 14B 720p 50 steps, whole generation (H800/H100): "
              + ", ".join(f"{n} GPU(s) {s} s" for n, s in OFFICIAL_14B_720P.items()))


def _options(r: dict) -> str:
    """A row's options, with what comm_overlap "auto" decided where the row left it to auto."""
    opts = r.get("options", "eager")
    decided = (r.get("layout_choice") or {}).get("comm_overlap")
    if decided is None or "overlap" in opts:  # one GPU, or overlap / nooverlap given
        return opts
    return f"{opts} (exchange {'overlapped' if decided else 'blocking'})"


if __name__ == "__main__":
    main()
