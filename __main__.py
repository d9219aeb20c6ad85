"""Command line: run a Wan transformer on N workers without ComfyUI and check it.

    python -m comfyui_xdit_usp run --gpus 2 --device cpu            # embedded tiny model
    python -m comfyui_xdit_usp vae --gpus 2 --device cpu --vae wan2.2   # the parallel VAE, tiny
    python -m comfyui_xdit_usp run --gpus 4 --tensor 2 --pipeline 2 --heads 4 --layers 4 --device cpu
    python -m comfyui_xdit_usp run --gpus 4 --checkpoint wan2.1_t2v_1.3B_bf16.safetensors \
        --frames 81 --height 480 --width 832 --steps 5 --parity

Prints the layout, the attention backend, the link probe (with more than one worker), where the
weights are held, the parity and the time per step.

Parity (--parity): the group's output against a plain single-process diffusers forward of the same
weights and inputs in fp32 with TF32 off (the reference), computed after the group has exited, on
GPU 0 when the group ran on GPUs (the weights streamed onto it, freed after), else on the CPU.
`rel_l2` = ||out - ref|| / ||ref||; `max_rel_err` = max |out - ref| / max |ref|. In bf16/fp16 the
same single-process forward in that dtype gives the rounding one device reaches (`floor_rel_l2`),
and `parity_ratio` = rel_l2 / floor_rel_l2: <= 1.5 means N devices round no worse than one (the
bar of issue 13; the max-abs ratio against one bf16 output only measures one bf16 step). With --json
the last line is one JSON object with keys layout, backend, world_size, placement,
param_bytes_per_rank (the largest rank's), param_bytes_total, param_bytes_ranks, peak_bytes_per_rank, max_rel_err, step_ms (and more: the
whole object is in `run`). --compile and --fp8-matmul turn on the speed options; `first_step_ms`
then includes compiling.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from . import parallel


# The CLI's words for the settings that config errors name (see ConfigError.render).
CLI_LABELS = {
    "world_size": "--gpus", "ulysses_degree": "--ulysses", "ring_degree": "--ring", "cfg_degree": "--cfg",
    "attention_backend": "--attention", "forward_timeout_s": "--timeout", "device='cpu'": "--device cpu",
    "device='cuda'": "--device cuda", "weight_sharding": "--shard", "weight_dtype": "--weight-dtype",
    "weight_sharding='fsdp'": "--shard fsdp", "weight_sharding='none'": "--shard none",
    "weight_dtype='fp8_e4m3fn'": "--weight-dtype fp8_e4m3fn",
    "gpu_memory_fraction": "--memory-fraction", "fp8_matmul": "--fp8-matmul",
    "comm_dtype='fp8'": "--comm-dtype fp8", "comm_dtype='default'": "--comm-dtype default", "comm_dtype": "--comm-dtype",
    "comm_overlap": "--overlap",
    "tensor_parallel_degree": "--tensor", "pipeline_parallel_degree": "--pipeline",
}


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: ...)" only where there is one to show
        return action.help if action.default in (None, False) else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: the user sees what to fix at once
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .parallel.config import ATTENTION_BACKENDS, COMM_DTYPES, WEIGHT_DTYPES, WEIGHT_SHARDING, XDitUSPConfig

    p = _Parser(prog="python -m comfyui_xdit_usp", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="launch N workers, run denoising steps, print parity and timing",
                       formatter_class=_Help)
    r.add_argument("--gpus", type=_int_at_least(1), default=2, help="number of workers (GPUs, or CPU ranks with --device cpu)")
    r.add_argument("--checkpoint", help="Wan transformer .safetensors file or diffusers folder (omitted: the embedded tiny model)")
    r.add_argument("--variant", default="t2v", choices=("t2v", "i2v", "flf2v", "vace", "ti2v_5b"),
                   help="tiny model variant when no checkpoint")
    r.add_argument("--ulysses", type=_int_at_least(0), default=0, help="Ulysses degree (0 = auto)")
    r.add_argument("--ring", type=_int_at_least(0), default=0, help="ring degree (0 = auto)")
    r.add_argument("--cfg", type=_int_at_least(0), default=0, help="CFG/batch split degree (0 = auto)")
    r.add_argument("--tensor", type=_int_at_least(1), default=1,
                   help="tensor parallel degree: each GPU holds heads / N of every attention layer and 1/N of every FFN")
    r.add_argument("--pipeline", type=_int_at_least(1), default=1,
                   help="pipeline parallel degree: each GPU holds a contiguous run of num_layers / N blocks")
    r.add_argument("--heads", type=_int_at_least(1), default=2,
                   help="attention heads of the embedded tiny model (128 channels each)")
    r.add_argument("--layers", type=_int_at_least(1), default=2, help="blocks of the embedded tiny model")
    r.add_argument("--batch", type=_int_at_least(1), default=2, help="batch per step (2 = cond + uncond, as ComfyUI sends them)")
    r.add_argument("--frames", type=_int_at_least(1), default=9, help="video frames, 4k+1 (latent frames = (F-1)/4+1)")
    r.add_argument("--height", type=_int_at_least(16), default=96, help="video height in pixels, a multiple of 16")
    r.add_argument("--width", type=_int_at_least(16), default=160, help="video width in pixels, a multiple of 16")
    r.add_argument("--steps", type=_int_at_least(1), default=3, help="timed forward calls (after one warm-up)")
    r.add_argument("--device", choices=("cuda", "cpu"), default=None, help="omitted: cuda if available, else cpu")
    r.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="omitted: fp32 on cpu, bf16 on cuda")
    r.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS, help="attention backend")
    r.add_argument("--shard", default=XDitUSPConfig.weight_sharding, choices=WEIGHT_SHARDING,
                   help="weights: none = whole model on every GPU; fsdp = 1/N per GPU, each block gathered as it "
                        "runs; auto = fsdp only when the model would not fit otherwise")
    r.add_argument("--weight-dtype", default=XDitUSPConfig.weight_dtype, choices=WEIGHT_DTYPES,
                   help="how Linear weights are held: default = the compute dtype (an fp8 file stays fp8); fp8_* = "
                        "that fp8 format, upcast per layer")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile each block's per-token work on the workers (the first step compiles)")
    r.add_argument("--fp8-matmul", action="store_true",
                   help="the blocks' Linear layers multiply in fp8 (e4m3 weights, per-token input scales); not exact")
    r.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=XDitUSPConfig.comm_overlap,
                   help="pipeline the sequence-parallel exchange with attention by head groups (exact); "
                        "--no-overlap: the blocking exchange. Default: by the link the group measures (on for "
                        "links slower than 40 GB/s, e.g. PCIe without peer-to-peer; off on NVLink)")
    r.add_argument("--comm-dtype", default=XDitUSPConfig.comm_dtype, choices=COMM_DTYPES,
                   help="what q/k/v and the attention output travel as between GPUs: default = the compute dtype; "
                        "fp8 = e4m3 with a scale per token and head (about half the bytes; not exact)")
    r.add_argument("--memory-fraction", type=float, default=XDitUSPConfig.gpu_memory_fraction,
                   help="the part of each GPU's memory the workers may use (0, 1]")
    r.add_argument("--timeout", type=_positive_seconds, default=XDitUSPConfig.forward_timeout_s,
                   help="seconds one forward may take before the group is declared stuck (a dead, hung or "
                        "stopped worker is reported within ~10 s regardless)")
    r.add_argument("--parity", action=argparse.BooleanOptionalAction, default=None,
                   help="compare with a single-process forward (omitted: on for the tiny model, off for checkpoints)")
    r.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    v = sub.add_parser("vae", help="decode (or encode) one video with the Wan VAE split over N workers, print parity and timing",
                       formatter_class=_Help)
    v.add_argument("--gpus", type=_int_at_least(1), default=2, help="number of workers (GPUs, or CPU ranks with --device cpu)")
    v.add_argument("--vae", choices=("wan2.1", "wan2.2"), default="wan2.1",
                   help="embedded tiny VAE when no checkpoint (2.1: z 16, 8x; 2.2: z 48, 16x)")
    v.add_argument("--checkpoint", help="a Wan VAE .safetensors file (ComfyUI's vae folder; omitted: the embedded tiny VAE)")
    v.add_argument("--encode", action="store_true", help="encode a random video instead of decoding a random latent")
    v.add_argument("--frames", type=_int_at_least(1), default=5, help="video frames, 4k+1 (latent frames = (F-1)/4+1)")
    v.add_argument("--height", type=_int_at_least(8), default=None,
                   help="video height in pixels, a multiple of 8 (2.1) or 16 (2.2); omitted: 11 latent rows, which "
                        "no N in 2..8 divides")
    v.add_argument("--width", type=_int_at_least(8), default=None,
                   help="video width in pixels; omitted: 12 latent columns")
    v.add_argument("--batch", type=_int_at_least(1), default=1, help="videos per call")
    v.add_argument("--schedule", default="",
                   help="decode: how frames go through the decoder's finer scales (auto, full1, full2, comfy, frame, "
                        "diffusers, whole, or frames per piece after each up block, e.g. 0,0,1; default auto: by "
                        "the band's size); every schedule gives the same video, they differ in speed and memory")
    v.add_argument("--repeat", type=_int_at_least(1), default=1, help="timed calls (after one warm-up)")
    v.add_argument("--device", choices=("cuda", "cpu"), default=None, help="omitted: cuda if available, else cpu")
    v.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="omitted: fp32 on cpu, bf16 on cuda")
    v.add_argument("--timeout", type=_positive_seconds, default=XDitUSPConfig.forward_timeout_s,
                   help="seconds one VAE call may take before the group is declared stuck")
    v.add_argument("--parity", action=argparse.BooleanOptionalAction, default=None,
                   help="compare with the single-process diffusers VAE (omitted: on for the tiny VAE, off for checkpoints)")
    v.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


def run(args) -> dict:
    import torch

    from . import wan_to_xdit_mapping as mapping
    from .parallel import reaper, tiny

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp32" if device == "cpu" else "bf16")
    latent = ((args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)

    config = parallel.XDitUSPConfig(
        world_size=args.gpus, ulysses_degree=args.ulysses, ring_degree=args.ring, cfg_degree=args.cfg,
        dtype=dtype, attention_backend=args.attention, device=device, forward_timeout_s=args.timeout,
        weight_sharding=args.shard, weight_dtype=args.weight_dtype, gpu_memory_fraction=args.memory_fraction,
        compile=args.compile, fp8_matmul=args.fp8_matmul, comm_overlap=args.overlap, comm_dtype=args.comm_dtype,
        tensor_parallel_degree=args.tensor, pipeline_parallel_degree=args.pipeline,
    ).validate()  # the visible GPUs too
    if args.checkpoint:
        if not os.path.exists(args.checkpoint):
            raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file or folder")
        info = mapping.inspect_checkpoint(args.checkpoint)
        variant, num_heads = info.variant, info.num_heads
    else:
        variant, num_heads = args.variant, args.heads
    layout = config.plan(num_heads)[0]  # fail before anything is built if the layout or kernel cannot work

    tmp = None if args.checkpoint else tempfile.mkdtemp(prefix="xdit_usp_tiny_")
    try:
        if tmp is None:
            path = args.checkpoint
        else:
            reaper.track("path", tmp)  # removed even if this process is killed
            path = os.path.join(tmp, f"tiny_wan_{variant}.safetensors")
            tiny.write_original_checkpoint(tiny.build_model(variant, heads=args.heads, layers=args.layers), path)
            info = mapping.inspect_checkpoint(path)
        return _run(args, config, layout, path, info, variant, latent)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            reaper.untrack("path", tmp)


def _run(args, config, layout, path, info, variant, latent) -> dict:
    import torch

    from .parallel import tiny

    cfg = info.diffusers_config
    g = torch.Generator().manual_seed(0)
    inputs = tiny.random_inputs(variant, args.batch, *latent, text_tokens=512, seed=1)
    if args.checkpoint:  # real shapes for real models
        inputs.hidden_states = torch.randn(args.batch, cfg["in_channels"], *latent, generator=g)
        inputs.encoder_hidden_states = torch.randn(args.batch, 512, cfg["text_dim"], generator=g)
        if cfg.get("image_dim"):
            n = 514 if cfg.get("pos_embed_seq_len") else 257
            inputs.encoder_hidden_states_image = torch.randn(args.batch, n, cfg["image_dim"], generator=g)
        if variant == "vace":
            inputs.control_hidden_states = torch.randn(args.batch, cfg["vace_in_channels"], *latent, generator=g)
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)

    with parallel.WorkerGroup(config) as group:
        t0 = time.perf_counter()
        loaded = group.load("main", path, latent=latent, batch=args.batch)
        load_s = time.perf_counter() - t0
        stats, times, worker_ms = {}, [], []
        out = group.forward("main", inputs, stats=stats)  # warm-up (and, with --compile, compilation)
        first_ms = stats["owner_ms"]
        for _ in range(args.steps):
            out = group.forward("main", inputs, stats=stats)
            times.append(stats["owner_ms"])
            worker_ms.append(stats["worker_ms"])
        step_layout = stats["layout"]

    parity = {}
    if args.parity if args.parity is not None else not args.checkpoint:
        parity = _parity(out, path, info, inputs, config)

    result = {
        "layout": str(step_layout),
        "configured_layout": str(layout),
        "backend": loaded.backend,
        "world_size": args.gpus,
        "placement": loaded.placement,
        "weight_dtype": config.storage_weight_dtype,
        "param_bytes_per_rank": loaded.param_bytes,  # the largest rank's
        "param_bytes_total": loaded.param_bytes_total,
        "param_bytes_ranks": loaded.param_bytes_per_rank,  # every rank's, in rank order
        "peak_bytes_per_rank": max(stats["peak_bytes"]) if None not in stats["peak_bytes"] else None,
        "memory_plan": loaded.memory_plan,
        "device": config.device,
        "dtype": config.dtype,
        "variant": variant,
        "checkpoint": args.checkpoint or "embedded tiny model",
        "latent": list(latent),
        "tokens": tokens,
        "batch": args.batch,
        "max_rel_err": parity.get("max_rel_err"),
        "rel_l2": parity.get("rel_l2"),
        "floor_rel_l2": parity.get("floor_rel_l2"),
        "parity_ratio": parity.get("parity_ratio"),
        "compiled": loaded.compiled,
        "fp8_matmul": loaded.fp8_matmul, "fp8_input_scaling": loaded.fp8_input_scaling,
        "comm_overlap": (loaded.layout_choice or {}).get("comm_overlap", False),  # what "auto" decided
        "comm_dtype": config.comm_dtype,
        "link": loaded.link,
        "layout_choice": loaded.layout_choice,
        "first_step_ms": first_ms,
        "step_ms": statistics.median(times),
        "worker_ms": statistics.median(worker_ms),
        "load_s": load_s,
    }
    return result


def _parity(out, path, info, inputs, config) -> dict:
    """The group's output against a plain single-process diffusers forward in fp32 (TF32 off), on
    GPU 0 when the group ran on GPUs (it has exited by now), else on the CPU. When the group computed
    in bf16/fp16, the same single-process forward in that dtype gives the rounding floor one device
    reaches, and `parity_ratio` = the group's error / that floor (<= 1.5 is the bar: splitting the
    work over N devices rounds no worse than one device does)."""
    from .parallel import tiny

    device = "cuda" if config.device == "cuda" else "cpu"
    ref = tiny.reference_from_checkpoint(path, info, inputs, device=device, batch_chunk=1)
    r = {"max_rel_err": tiny.rel_err(out, ref), "rel_l2": tiny.rel_l2(out, ref)}
    if config.dtype != "fp32":
        floor = tiny.reference_from_checkpoint(path, info, inputs, device=device, dtype=config.torch_dtype(),
                                               batch_chunk=1)
        r["floor_rel_l2"] = tiny.rel_l2(floor, ref)
        r["parity_ratio"] = r["rel_l2"] / r["floor_rel_l2"] if r["floor_rel_l2"] else None
    return r


def run_vae(args) -> dict:
    """The `vae` command: one decode (or encode) on N workers, against the single-process diffusers VAE."""
    import torch

    from .parallel import tiny
    from .wan_to_xdit_mapping import inspect_vae, vae_to_diffusers

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp32" if device == "cpu" else "bf16")
    config = parallel.XDitUSPConfig(world_size=args.gpus, dtype=dtype, device=device,
                                    forward_timeout_s=args.timeout).validate()
    version = args.vae.removeprefix("wan")

    from .parallel.sp_vae import decode_pieces

    try:
        decode_pieces(args.schedule, 0)
    except ValueError as e:
        raise _UsageError(f"argument --schedule: {e}") from None

    def size(s: int) -> tuple[int, int, tuple]:  # every size error before anything is built or read
        height, width = args.height or 11 * s, args.width or 12 * s
        for name, value in (("height", height), ("width", width)):
            if value % s:
                raise _UsageError(f"argument --{name}: must be a multiple of {s} for the Wan {version} VAE, got {value}")
        latent = ((args.frames - 1) // 4 + 1, height // s, width // s)
        if latent[1] < args.gpus:
            raise _UsageError(f"--height {height} is {latent[1]} latent rows: fewer than --gpus {args.gpus}")
        return height, width, latent

    if args.checkpoint:
        from safetensors.torch import load_file

        if not os.path.exists(args.checkpoint):
            raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file")
        state = load_file(args.checkpoint)
        state = {k[len("vae."):] if k.startswith("vae.") else k: v for k, v in state.items()}
        info = inspect_vae(state)
        version = info.version
        height, width, latent = size(info.spatial)
        vae = None
    else:
        height, width, latent = size(16 if version == "2.2" else 8)
        vae = tiny.build_vae(version)
        state = tiny.vae_comfy_state_dict(vae, version)
        info = inspect_vae(state)
    g = torch.Generator().manual_seed(0)
    if args.encode:
        channels = info.diffusers_config["in_channels"] // (info.diffusers_config.get("patch_size") or 1) ** 2
        x = torch.rand(args.batch, channels, args.frames, height, width, generator=g) * 2 - 1
    else:
        x = torch.randn(args.batch, info.z_dim, *latent, generator=g)

    from .parallel.sp_vae import split_rows

    with parallel.WorkerGroup(config) as group:
        t0 = time.perf_counter()
        key = group.vae_load(state, dtype)
        load_s = time.perf_counter() - t0
        run = group.vae_encode if args.encode else functools.partial(group.vae_decode, schedule=args.schedule)
        stats, times, worker_ms = {}, [], []
        out = run(key, x, stats=stats)  # warm-up
        for _ in range(args.repeat):
            out = run(key, x, stats=stats)
            times.append(stats["owner_ms"])
            worker_ms.append(stats["worker_ms"])

    parity = None
    if args.parity if args.parity is not None else not args.checkpoint:
        import diffusers

        if vae is None:
            tensors, _ = vae_to_diffusers(state, info)
            vae = diffusers.AutoencoderKLWan(**info.diffusers_config)
            vae.load_state_dict({k: t.float() for k, t in tensors.items()})
        ref_device = "cuda" if device == "cuda" else "cpu"
        ref = tiny.vae_reference(vae.float().to(ref_device).eval(), x.to(ref_device), args.encode).cpu()
        parity = tiny.rel_err(out, ref)
    peak = stats["peak_bytes"] if None not in stats["peak_bytes"] else None
    return {
        "command": "vae", "vae": f"wan{info.version}", "checkpoint": args.checkpoint or "embedded tiny VAE",
        "mode": "encode" if args.encode else "decode", "world_size": args.gpus, "device": device, "dtype": dtype,
        "video": [args.batch, args.frames, height, width], "latent": list(latent),
        "latent_rows_per_rank": [n for _, n in split_rows(latent[1], args.gpus)],
        "layout": f"rows split {'/'.join(str(n) for _, n in split_rows(latent[1], args.gpus))} (latent rows per rank)",
        "schedule": None if args.encode else "/".join(dict.fromkeys(stats["schedule"])),
        "max_rel_err": parity, "ms": statistics.median(times), "worker_ms": statistics.median(worker_ms),
        "load_s": load_s, "peak_bytes_per_rank": peak, "peak_rss_per_rank": stats["peak_rss"], "key": key,
    }


class _UsageError(ValueError):
    """A bad command-line value found after parsing (exit 2, one line)."""


def main(argv=None) -> int:
    """Exit 0 on success, 1 when the workers fail, 2 on a user error (one line), 130 on Ctrl-C."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if (args.frames - 1) % 4:
            parser.error(f"argument --frames: must be 4k+1 (1, 5, ..., 81: Wan's VAE), got {args.frames}")
        for name in ("height", "width") if args.command == "run" else ():
            if getattr(args, name) % 16:
                parser.error(f"argument --{name}: must be a multiple of 16 (VAE x patch size), got {getattr(args, name)}")
        from .parallel.config import ConfigError
        from .wan_to_xdit_mapping import CheckpointError

        try:
            r = run_vae(args) if args.command == "vae" else run(args)
        except _UsageError as e:
            parser.error(str(e))
        except ConfigError as e:
            print(f"error: {e.render(CLI_LABELS)}", file=sys.stderr)
            return 2
        except (CheckpointError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except ValueError as e:  # the VAE's input checks (launcher.vae_output_shape)
            if args.command != "vae":
                raise
            print(f"error: {e}", file=sys.stderr)
            return 2
        except parallel.WorkerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:  # the group (if any) was killed on the way out; nothing to report
        print("interrupted", file=sys.stderr)
        return 130
    if args.command == "vae":
        _print_vae(r, args.json)
    if args.command == "run":
        err = "n/a" if r["max_rel_err"] is None else f"{r['max_rel_err']:.2e}"
        print(f"model      {r['checkpoint']} ({r['variant']}), latent {r['latent']} = {r['tokens']} tokens, batch {r['batch']}")
        print(f"layout     {r['layout']} on {r['world_size']} {r['device']} worker(s), {r['dtype']}")
        print(f"attention  {r['backend']}")
        link = r["link"] or {}
        if link.get("world", 1) > 1:
            print(f"link       all-to-all {link['a2a_gbps']:.1f} GB/s, ring P2P {link['p2p_gbps']:.1f} GB/s, latency "
                  f"{link['latency_us']:.0f} us, {100 * link['overlap']:.0f}% hidden behind attention; layout "
                  f"{r['layout_choice']['rule']}" + (", exchange overlapped" if r["comm_overlap"] else "")
                  + (", fp8 wire" if r["comm_dtype"] == "fp8" else ""))
        peak = "" if r["peak_bytes_per_rank"] is None else f", peak {r['peak_bytes_per_rank'] / 1e9:.2f} GB per GPU in a forward"
        print(f"weights    {r['placement']}: {r['param_bytes_per_rank'] / 1e9:.3f} GB on the largest rank of "
              f"{r['param_bytes_total'] / 1e9:.3f} GB{peak}")
        inexact = r["fp8_matmul"] or r["backend"] == "sage" or r["weight_dtype"] != "default" or r["comm_dtype"] != "default"
        if r["max_rel_err"] is None:
            print("parity     not computed (--parity computes it)")
        else:
            print(f"parity     vs single-process diffusers forward in fp32: max relative error {err}, "
                  f"relative L2 {r['rel_l2']:.2e}"
                  + ("" if r["parity_ratio"] is None else
                     f"; one device in {r['dtype']}: relative L2 {r['floor_rel_l2']:.2e}, "
                     f"ratio {r['parity_ratio']:.2f}"
                     + (" (fp8 weights, matmuls or wire, or 8-bit attention: not exact by design)" if inexact else
                        " (<= 1.5: no worse than one device)")))
        print(f"time       {r['step_ms']:.1f} ms/step (in workers {r['worker_ms']:.1f} ms), load {r['load_s']:.1f} s, "
              f"first step {r['first_step_ms'] / 1e3:.1f} s" + (" (compiling)" if r["compiled"] else ""))
        if args.json:
            print(json.dumps(r))
    return 0


def _print_vae(r: dict, as_json: bool):
    mb = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    print(f"vae        {r['checkpoint']} ({r['vae']}), {r['mode']} of {r['video'][0]} x {r['video'][1]} frames "
          f"{r['video'][2]}x{r['video'][3]} (latent {r['latent']})")
    print(f"layout     {r['layout']} on {r['world_size']} {r['device']} worker(s), {r['dtype']}"
          + (f", decode schedule {r['schedule']}" if r["schedule"] else ""))
    print("parity     " + ("not computed (--parity computes it)" if r["max_rel_err"] is None else
                           f"vs single-process diffusers VAE in fp32: max relative error {r['max_rel_err']:.2e}"))
    print(f"time       {r['ms']:.1f} ms (in workers {r['worker_ms']:.1f} ms), start + weights {r['load_s']:.1f} s")
    if r["peak_bytes_per_rank"] is not None:
        print("memory     peak allocated per GPU: " + ", ".join(mb(b) for b in r["peak_bytes_per_rank"]))
    else:
        print("memory     peak RSS per rank (whole process): " + ", ".join(mb(b) for b in r["peak_rss_per_rank"]))
    if as_json:
        print(json.dumps(r))


def cli():
    """The console entry point: `main`, and on Ctrl-C an immediate exit once the group is gone
    (the interpreter's teardown of torch can take seconds; nothing is left for it to clean)."""
    rc = main()
    if rc == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    cli()
