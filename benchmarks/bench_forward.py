"""One-GPU speed: Wan forward time against the hardware floor, attention backends, owner<->worker overhead.

Runs on a CUDA machine (see BENCHMARKS.md for the command and results). Everything compared is
measured in this same run on the same card:

  rates      bf16 GEMM (8192^3) and cuDNN SDPA at each model's attention shape -> the floor
  backends   each attention kernel at the real shape: time, bf16 error vs fp32, and (for the
             kernels with a log-sum-exp) a two-block ring merge vs fp32
  forward    1.3B-shaped at 832x480x81 and 14B-shaped at 1280x720x81, random bf16 weights (fp32
             rope/time embedder/norms/modulation, as diffusers loads them): plain diffusers forward
             (its SDPA dispatch) vs our sequence-parallel forward at sp=1 with each backend
  transport  a real world-size-1 worker group (torchrun, NCCL, shared memory) on a 1.3B checkpoint
             written to disk: owner-side time per call minus in-worker time, 480p and 720p latents

FLOPs per forward: attention 4*S^2*dim per layer (S = video tokens); linear 2*S*(parameters of the
linear layers applied per video token; cross-attention k/v act on the 512 text tokens, excluded).
Floor = attention FLOPs at the measured cuDNN rate + linear FLOPs at the measured GEMM rate.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import SHAPES, cuda_time, latent_shape, tokens  # noqa: E402

from comfyui_xdit_usp.parallel import WorkerGroup, XDitUSPConfig, attention, sp_wan, tiny  # noqa: E402
from comfyui_xdit_usp.parallel.protocol import ForwardInputs  # noqa: E402

RESULTS: dict = {}


def emit(key, value):
    RESULTS[key] = value
    print(json.dumps({key: value}), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_forward.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)


def gemm_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, warmup=3, reps=10)
    return 2 * 8192**3 / t


def attn_inputs(s, h, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(1, s, h, 128, device="cuda", dtype=dtype, generator=g) for _ in range(3)]


def bench_backends(model_name: str):
    from yunchang.ring.utils import update_out_and_lse

    h = SHAPES[model_name]["num_attention_heads"]
    res = "480p" if model_name == "1.3b" else "720p"
    s = tokens(res)
    q, k, v = attn_inputs(s, h)
    scale = 1 / math.sqrt(128)
    flops = 4 * s * s * h * 128
    # precision at a size where an fp32 reference fits
    sq, kq, vq = attn_inputs(4096, h, seed=1)
    ref = attention._backends()["math"].plain(sq.float(), kq.float(), vq.float(), scale)
    out = {}
    for name in ("cudnn", "flash", "efficient"):
        b = attention._backends()[name]
        row = {}
        try:
            row["plain_s"] = cuda_time(lambda: b.plain(q, k, v, scale), warmup=2, reps=5)
            row["plain_tflops"] = flops / row["plain_s"] / 1e12
            row["lse_s"] = cuda_time(lambda: b.lse(q, k, v, scale), warmup=2, reps=5)
            row["lse_tflops"] = flops / row["lse_s"] / 1e12
            o = b.plain(sq, kq, vq, scale).float()
            row["bf16_rel_err"] = tiny.rel_err(o, ref)
            acc = lse = None
            for kb, vb in ((kq[:, :2500], vq[:, :2500]), (kq[:, 2500:], vq[:, 2500:])):  # uneven blocks
                bo, bl = b.lse(sq, kb, vb, scale)
                acc, lse = update_out_and_lse(acc, lse, bo, bl)
            row["ring_merge_rel_err"] = tiny.rel_err(acc, ref)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run is a result too
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        out[name] = row
    try:  # xfuser's own registered kernels (the same aten ops when FA3/FA4/Sage are absent)
        from xfuser.core.distributed import attention_backend as xab

        fn = xab._cudnn_attn_call
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        t_x = cuda_time(lambda: fn(qt, kt, vt, 0.0, False), warmup=2, reps=5)
        out["xfuser_cudnn"] = {"plain_s": t_x, "plain_tflops": flops / t_x / 1e12}
        import importlib.util

        out["xfuser_optional_kernels"] = {
            m: importlib.util.find_spec(m) is not None
            for m in ("flash_attn", "flash_attn_interface", "flash_attn.cute", "sageattention")
            if "." not in m or importlib.util.find_spec(m.split(".")[0]) is not None
        }
    except Exception as e:  # noqa: BLE001
        out["xfuser"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    ok = {n: r for n, r in out.items() if "plain_s" in r and r.get("bf16_rel_err", 0) <= 1e-2}
    ring_ok = {n: r for n, r in ok.items() if "lse_s" in r and r.get("ring_merge_rel_err", 1) <= 1e-2}
    out["fastest_ulysses"] = min(ok, key=lambda n: ok[n]["plain_s"]) if ok else None
    out["fastest_ring"] = min(ring_ok, key=lambda n: ring_ok[n]["lse_s"]) if ring_ok else None
    emit(f"backends_{model_name}_{res}", out)
    return out


def _time_cudnn(s: int, heads: int) -> float:
    """Seconds per cuDNN SDPA call at this model's attention shape (its inputs freed on return)."""
    q, k, v = attn_inputs(s, heads)
    return cuda_time(lambda: attention._backends()["cudnn"].plain(q, k, v, 1 / math.sqrt(128)), warmup=2, reps=5)


def keep_fp32(name: str) -> bool:
    return any(p in ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3") for p in name.split("."))


@torch.no_grad()
def build_random(model_name: str):
    from diffusers import WanTransformer3DModel

    with torch.device("cuda"):
        m = WanTransformer3DModel(**SHAPES[model_name])
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, p in m.named_parameters():
        p.data = torch.randn(p.shape, device="cuda", generator=g).mul_(0.02).to(
            torch.float32 if keep_fp32(name) else torch.bfloat16)
    torch.cuda.empty_cache()
    return m.eval().requires_grad_(False)


def flop_count(m, s: int) -> tuple[float, float]:
    dim = m.config.num_attention_heads * m.config.attention_head_dim
    per_token = 0
    for name, mod in m.blocks[0].named_modules():
        if isinstance(mod, torch.nn.Linear) and name not in ("attn2.to_k", "attn2.to_v"):
            per_token += mod.weight.numel()
    per_token = per_token * m.config.num_layers + m.proj_out.weight.numel()
    return 4 * s * s * dim * m.config.num_layers, 2 * s * per_token


@torch.no_grad()
def bench_forward(model_name: str, res: str, gemm: float, reps: int):
    m = build_random(model_name)
    c, f, hh, ww = latent_shape(res)
    s = tokens(res)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, c, f, hh, ww, device="cuda", generator=g).to(torch.bfloat16)
    t = torch.tensor([500.0], device="cuda")
    ctx = torch.randn(1, 512, 4096, device="cuda", generator=g).to(torch.bfloat16)
    heads = m.config.num_attention_heads
    cudnn_s = _time_cudnn(s, heads)
    attn_flops, lin_flops = flop_count(m, s)
    attn_rate = 4 * s * s * heads * 128 / cudnn_s
    floor = attn_flops / attn_rate + lin_flops / gemm
    row = {"tokens": s, "attn_pflop": attn_flops / 1e15, "linear_pflop": lin_flops / 1e15,
           "cudnn_tflops": attn_rate / 1e12, "gemm_tflops": gemm / 1e12, "floor_s": floor}

    torch.cuda.reset_peak_memory_stats()
    ref = None

    def diffusers_fwd():
        nonlocal ref
        ref = m(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]

    row["diffusers_s"] = cuda_time(diffusers_fwd, warmup=1, reps=reps)
    row["diffusers_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    row["diffusers_floor_ratio"] = floor / row["diffusers_s"]
    ref = ref.float()
    group = attention.SPGroup(1, 1, 1, None, None, None, [0], 0)
    for backend in ("cudnn", "flash"):
        runner = sp_wan.SequenceParallelWan(m, attention.resolve_backend(backend, "cuda", 1))
        out = None

        def ours():
            nonlocal out
            out = runner.forward(group, ForwardInputs(x, t, ctx))

        torch.cuda.reset_peak_memory_stats()
        try:
            row[f"ours_{backend}_s"] = cuda_time(ours, warmup=1, reps=reps)
        except Exception as e:  # noqa: BLE001
            row[f"ours_{backend}_error"] = f"{type(e).__name__}: {e}"[:300]
            continue
        row[f"ours_{backend}_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        row[f"ours_{backend}_floor_ratio"] = floor / row[f"ours_{backend}_s"]
        row[f"ours_{backend}_vs_diffusers"] = row[f"ours_{backend}_s"] / row["diffusers_s"]
        row[f"ours_{backend}_rel_err_vs_diffusers"] = tiny.rel_err(out, ref)
    emit(f"forward_{model_name}_{res}", row)
    return m, row


def bench_transport(m, reps: int, diffusers_s: float | None = None):
    """World-size-1 worker group on the GPU: owner time per call minus in-worker forward time."""
    d = tempfile.mkdtemp(prefix="xdit_bench_")
    path = os.path.join(d, "wan_1.3b_random.safetensors")
    tiny.write_original_checkpoint(m, path)
    del m
    torch.cuda.empty_cache()
    rows = {}
    cfg = XDitUSPConfig(world_size=1, device="cuda", dtype="bf16", attention_backend="auto")
    with WorkerGroup(cfg) as group:
        t0 = time.perf_counter()
        info = group.load("m", path)
        rows["load_s"] = time.perf_counter() - t0
        rows["backend"] = info.backend
        for res in ("480p", "720p"):
            for batch in (1, 2):
                c, f, hh, ww = latent_shape(res)
                x = torch.randn(batch, c, f, hh, ww)
                ctx = torch.randn(batch, 512, 4096)
                t = torch.full((batch,), 500.0)
                stats, runs = {}, []
                group.forward("m", ForwardInputs(x, t, ctx), stats=stats)
                for _ in range(reps):
                    group.forward("m", ForwardInputs(x, t, ctx), stats=stats)
                    runs.append(dict(stats))
                med = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0] if k.endswith("_ms")}
                o, w = med["owner_ms"], med["worker_ms"]
                wire = 2  # bytes per element on the wire (bf16 group)
                nbytes = (x.numel() * 2 + ctx.numel()) * wire + t.numel() * 4  # inputs + output
                rows[f"{res}_b{batch}"] = dict(
                    med, overhead_ms=o - w, overhead_pct=100 * (o - w) / w, pinned=stats["pinned"],
                    mbytes=nbytes / 1e6, gb_per_s=nbytes / max(o - w, 1e-6) / 1e6,
                )
    if diffusers_s:  # same run, same card: the whole world-size-1 call vs the in-process diffusers forward
        rows["group_480p_b1_vs_diffusers"] = rows["480p_b1"]["owner_ms"] / 1e3 / diffusers_s
        rows["diffusers_480p_b1_s"] = diffusers_s
    emit("transport_ws1_1.3b", rows)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="1.3b,14b")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip", default="", help="comma list of sections to skip: backends,forward,transport")
    a = p.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    emit("device", {"name": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "cudnn": torch.backends.cudnn.version(), "date": time.strftime("%Y-%m-%d")})
    gemm = gemm_rate()
    emit("gemm_bf16_tflops", gemm / 1e12)
    for name in a.models.split(","):
        if "backends" not in skip:
            bench_backends(name)
        if "forward" in skip and not (name == "1.3b" and "transport" not in skip):
            continue
        res = "480p" if name == "1.3b" else "720p"
        m, row = bench_forward(name, res, gemm, a.reps) if "forward" not in skip else (build_random(name), {})
        if name == "1.3b" and "transport" not in skip:
            bench_transport(m, reps=5, diffusers_s=row.get("diffusers_s"))
        del m
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
