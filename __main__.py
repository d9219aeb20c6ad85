"""Command line: run a Wan transformer on N workers without ComfyUI and check it.

    python -m comfyui_xdit_usp run --gpus 2 --device cpu            # embedded tiny model
    python -m comfyui_xdit_usp run --gpus 4 --checkpoint wan2.1_t2v_1.3B_bf16.safetensors \
        --frames 81 --height 480 --width 832 --steps 5 --parity

Prints the layout, the attention backend, the max relative error against a single-process
diffusers forward of the same weights, and the time per step. With --json the last line is one
JSON object with keys layout, backend, world_size, max_rel_err, step_ms.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def _package():
    # Works as `python -m comfyui_xdit_usp` (installed) and as `python -m <folder name>`.
    return __package__ or "comfyui_xdit_usp"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m comfyui_xdit_usp", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="launch N workers, run denoising steps, print parity and timing")
    r.add_argument("--gpus", type=int, default=2, help="number of workers (GPUs, or CPU ranks with --device cpu)")
    r.add_argument("--checkpoint", help="Wan transformer .safetensors file or diffusers folder (default: embedded tiny model)")
    r.add_argument("--variant", default="t2v", help="tiny model variant when no checkpoint: t2v i2v flf2v vace ti2v_5b")
    r.add_argument("--ulysses", type=int, default=0, help="Ulysses degree (0 = auto)")
    r.add_argument("--ring", type=int, default=0, help="ring degree (0 = auto)")
    r.add_argument("--cfg", type=int, default=0, help="CFG/batch split degree (0 = auto)")
    r.add_argument("--batch", type=int, default=2, help="batch per step (2 = cond + uncond, as ComfyUI sends them)")
    r.add_argument("--frames", type=int, default=9, help="video frames (latent frames = (F-1)/4+1)")
    r.add_argument("--height", type=int, default=96, help="video height in pixels (latent = H/8)")
    r.add_argument("--width", type=int, default=160, help="video width in pixels (latent = W/8)")
    r.add_argument("--steps", type=int, default=3, help="timed forward calls (after one warm-up)")
    r.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    r.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: fp32 on cpu, bf16 on cuda")
    r.add_argument("--attention", default="auto", help="attention backend (auto, cudnn, flash, efficient, sdpa, cpu_flash, ...)")
    r.add_argument("--parity", action=argparse.BooleanOptionalAction, default=None,
                   help="compare with a single-process forward (default: on for the tiny model, off for checkpoints)")
    r.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


def run(args) -> dict:
    import importlib

    import torch

    pkg = _package()
    parallel = importlib.import_module(pkg + ".parallel")
    tiny = importlib.import_module(pkg + ".parallel.tiny")
    mapping = importlib.import_module(pkg + ".wan_to_xdit_mapping")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp32" if device == "cpu" else "bf16")
    if (args.frames - 1) % 4 or args.height % 16 or args.width % 16:
        raise SystemExit("--frames must be 4k+1 and --height/--width multiples of 16 (Wan's VAE and patch size)")
    latent = ((args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)

    config = parallel.XDitUSPConfig(
        world_size=args.gpus, ulysses_degree=args.ulysses, ring_degree=args.ring, cfg_degree=args.cfg,
        dtype=dtype, attention_backend=args.attention, device=device,
    )
    tmp = None
    if args.checkpoint:
        path = args.checkpoint
        info = mapping.inspect_checkpoint(path)
        variant = info.variant
    else:
        tmp = tempfile.TemporaryDirectory(prefix="xdit_usp_tiny_")
        variant = args.variant
        model = tiny.build_model(variant)
        path = tiny.write_original_checkpoint(model, os.path.join(tmp.name, f"tiny_wan_{variant}.safetensors"))
        info = mapping.inspect_checkpoint(path)
    layout = config.resolve(info.num_heads)  # fail before launching if the layout cannot work

    cfg = info.diffusers_config
    g = torch.Generator().manual_seed(0)
    inputs = tiny.random_inputs(variant, args.batch, *latent, text_tokens=512, seed=1)
    if args.checkpoint:  # real shapes for real models
        inputs["hidden_states"] = torch.randn(args.batch, cfg["in_channels"], *latent, generator=g)
        inputs["encoder_hidden_states"] = torch.randn(args.batch, 512, cfg["text_dim"], generator=g)
        if cfg.get("image_dim"):
            n = 514 if cfg.get("pos_embed_seq_len") else 257
            inputs["encoder_hidden_states_image"] = torch.randn(args.batch, n, cfg["image_dim"], generator=g)
        if variant == "vace":
            inputs["control_hidden_states"] = torch.randn(args.batch, cfg["vace_in_channels"], *latent, generator=g)
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)

    with parallel.WorkerGroup(config) as group:
        t0 = time.perf_counter()
        loaded = group.load("main", path)
        load_s = time.perf_counter() - t0
        stats, times, worker_ms = {}, [], []
        out = group.forward("main", **inputs, stats=stats)  # warm-up
        for _ in range(args.steps):
            out = group.forward("main", **inputs, stats=stats)
            times.append(stats["owner_ms"])
            worker_ms.append(stats["worker_ms"])
        step_layout = stats["layout"]

    max_rel_err = None
    parity = args.parity if args.parity is not None else not args.checkpoint
    if parity:
        import diffusers

        state, _ = mapping.load_checkpoint(path)
        ref_model = getattr(diffusers, info.diffusers_class)(**cfg)
        ref_model.load_state_dict(state, strict=True)
        ref_model.eval()
        ref = tiny.reference_forward(ref_model, **inputs)
        max_rel_err = ((out.float() - ref).abs().max() / ref.abs().max()).item()

    result = {
        "layout": step_layout,
        "configured_layout": str(layout),
        "backend": loaded["backend"],
        "world_size": args.gpus,
        "device": device,
        "dtype": dtype,
        "variant": variant,
        "checkpoint": args.checkpoint or "embedded tiny model",
        "latent": list(latent),
        "tokens": tokens,
        "batch": args.batch,
        "max_rel_err": max_rel_err,
        "step_ms": statistics.median(times),
        "worker_ms": statistics.median(worker_ms),
        "load_s": load_s,
    }
    if tmp is not None:
        tmp.cleanup()
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        r = run(args)
        err = "n/a" if r["max_rel_err"] is None else f"{r['max_rel_err']:.2e}"
        print(f"model      {r['checkpoint']} ({r['variant']}), latent {r['latent']} = {r['tokens']} tokens, batch {r['batch']}")
        print(f"layout     {r['layout']} on {r['world_size']} {r['device']} worker(s), {r['dtype']}")
        print(f"attention  {r['backend']}")
        print(f"parity     max relative error vs single-process diffusers forward: {err}")
        print(f"time       {r['step_ms']:.1f} ms/step (in workers {r['worker_ms']:.1f} ms), load {r['load_s']:.1f} s")
        if args.json:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
