"""The example graph in real ComfyUI, native vs the pack, on GPUs (issue 12).

    python3 benchmarks/bench_comfyui.py --model 1.3b            # 832x480x81, 20 steps
    python3 benchmarks/bench_comfyui.py --model 14b --steps 4   # 1280x720x81
    python3 benchmarks/bench_comfyui.py --model tiny --device cpu --steps 2   # CPU check

ComfyUI runs in this process through its own executor (execution.PromptExecutor, as the tests drive
it; no server, no frontend). ComfyUI is found in --comfyui-dir, else $COMFYUI_DIR, else the repo's
`.comfy/` (benchmarks/comfyui_bundle.sh). Every graph is

    loader -> ModelSamplingSD3 (shift 8) -> KSampler (euler, simple, seed 7) -> VAEDecode -> capture
    random conditioning (512 x 4096, no text encoder) -> KSampler;  VAELoader -> VAEDecode

with a random-weight Wan 2.1 T2V transformer of the real shape (original key names, bf16) and a
random-weight Wan 2.1 VAE of the real shape (ComfyUI's own class, detected by comfy.sd.VAE from its
state dict). The graphs (--graphs):

    a   native UNETLoader (weight_dtype default), 1 GPU, cfg 5
    b   ours, Config gpus=1, cfg 5                -> the bf16 noise floor against a
    c   ours, Config gpus=2, auto layout, cfg 5   -> compared with a; should be within 2x of b
    a1  native, cfg 1 (batch 1)
    d   ours, gpus=2, cfg_degree 1, ulysses 2, cfg 1   -> compared with a1

Any graph takes modifiers joined by "+" (MODIFIERS): `ec` EasyCache, `lc` LazyCache, `tc`
TorchCompileModel, `fp8` the loader's fp8_e4m3fn_fast, e.g. `--graphs a,a+ec,b,b+tc+fp8+ec` (issue 14:
sampling totals with the speed options and native caches, ours next to native with the same nodes).

Per graph: seconds per step (median of the per-step callback intervals, first step apart), the
sampling time (CFGGuider.inner_sample, after the models are loaded), the KSampler node time (with
the model load), the VAE decode node time, end to end (PromptExecutor.execute), peak memory:
ComfyUI's process (torch.cuda.max_memory_allocated per device, reset before each graph), the
workers (the largest per-forward `peak_bytes` of each rank, WorkerGroup.forward's stats) and
nvidia-smi's memory.used per GPU (both processes, sampled every 0.2 s), and the final latent's
relative L2 difference from its native reference (same seed, same graph). Results go to
$OUT/bench_comfyui_<model>.json (else ./) after each graph; a Markdown table is printed at the end.
Final latents are also saved beside the checkpoints, so a reference run in an earlier call (same
model, size, steps) is found again.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import importlib.abc
import importlib.util
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

import torch  # noqa: E402

import comfy_harness  # noqa: E402  (tests/: the executor stub and the conditioning node the tests use too)

SIZES = {"tiny": (64, 48, 5), "1.3b": (832, 480, 81), "14b": (1280, 720, 81)}  # width, height, frames
TINY_TEXT_DIM = 64
GRAPHS = {
    "a": dict(ours=False, cfg=5.0, ref=None, desc="native UNETLoader, 1 GPU"),
    "b": dict(ours=True, gpus=1, cfg=5.0, ref="a", desc="ours gpus=1"),
    "c": dict(ours=True, gpus=2, cfg=5.0, ref="a", desc="ours gpus=2 auto"),
    "a1": dict(ours=False, cfg=1.0, ref=None, desc="native UNETLoader, 1 GPU, cfg 1"),
    "d": dict(ours=True, gpus=2, cfg=1.0, cfg_degree=1, ulysses=2, ref="a1", desc="ours gpus=2 cfg1 x ulysses2"),
}
# Modifiers, joined to a graph's name with "+" (e.g. a+ec, c+tc+fp8+ec): native nodes inserted into
# the same graph, the way a user adds them. The latent is compared with the base graph's reference
# (the quality the modifier costs) and with the native graph of the same modifiers when it ran (our
# MODEL through the node vs native through the node).
MODIFIERS = {
    "ec": "EasyCache (defaults: reuse_threshold 0.2, start 0.15, end 0.95)",
    "lc": "LazyCache (defaults: reuse_threshold 0.2, start 0.15, end 0.95)",
    "tc": "TorchCompileModel (inductor); on our MODEL it turns on the workers' compile",
    "fp8": "weight_dtype fp8_e4m3fn_fast (fp8 matmuls)",
}
SEED = 7
GB = 2**30


def graph_spec(name: str) -> dict:
    """The spec of a graph name: a base graph of GRAPHS and its modifiers."""
    base, *mods = name.split("+")
    if base not in GRAPHS or any(m not in MODIFIERS for m in mods):
        raise KeyError(name)
    spec = dict(GRAPHS[base], base=base, mods=mods)
    if mods:
        spec["desc"] = spec["desc"] + " + " + " + ".join(mods)
        spec["ref"] = spec["ref"] or base  # a native graph with modifiers: against the plain native one
        spec["ref_same"] = "+".join([spec["ref"]] + mods) if spec["ours"] else None
    return spec


# ----------------------------------------------------------------------------------- ComfyUI boot
def _stub_av():
    """ComfyUI's comfy_api imports PyAV (video files) at import time; the executor path of these
    graphs never calls it. Where PyAV is not installed (the GPU image lacks it and its wheel is
    36 MB), a stub stands in: any attribute is a placeholder class, calling one raises."""
    try:
        if importlib.util.find_spec("av") is not None:
            return False
    except ImportError:
        pass
    import torchvision.io  # noqa: F401  (imports `av` if it can and calls it: let it see none)

    class _Meta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return f"av-stub:{cls.__name__}.{name}"

    class _Stub(metaclass=_Meta):
        def __init__(self, *a, **k):
            raise RuntimeError("PyAV is not installed here (benchmark stub)")

    class _Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Meta(name, (_Stub,), {})

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name == "av" or name.startswith("av."):
                return importlib.util.spec_from_loader(name, self, is_package=True)
            return None

        def create_module(self, spec):
            m = _Module(spec.name)
            m.__path__ = []
            return m

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _Finder())
    return True


def comfy_dir(arg: str | None) -> str:
    for d in (arg, os.environ.get("COMFYUI_DIR"), os.path.join(REPO, ".comfy")):
        if d and os.path.isfile(os.path.join(d, "comfy", "model_management.py")):
            return os.path.abspath(d)
    raise SystemExit("no ComfyUI found: pass --comfyui-dir, set COMFYUI_DIR, or run benchmarks/comfyui_bundle.sh")


def boot(directory: str, cpu: bool):
    """Import ComfyUI from `directory`, load its built-in nodes and this checkout as a custom node
    pack (nodes.load_custom_node, as ComfyUI does for custom_nodes/<pack>); returns `nodes`."""
    if directory not in sys.path:
        sys.path.insert(0, directory)
    argv = sys.argv
    sys.argv = ["main.py", "--disable-all-custom-nodes"] + (["--cpu"] if cpu else [])
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401  (parses the args)
        import nodes
    finally:
        sys.argv = argv
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(REPO)):
        raise RuntimeError("ComfyUI failed to load the pack as a custom node (see the log)")
    missing = [n for n in ("UNETLoader", "VAELoader", "VAEDecode", "KSampler", "ModelSamplingSD3",
                           "EmptyHunyuanLatentVideo", "XDitUSPConfigNode", "XDitUSPWanVideoModelLoader")
               if n not in nodes.NODE_CLASS_MAPPINGS]
    if missing:
        raise RuntimeError(f"ComfyUI lacks the nodes {missing} (see the import warnings above)")
    nodes.NODE_CLASS_MAPPINGS.update({"XDitBenchRandomConditioning": comfy_harness.RandomConditioning,
                                      "XDitBenchCapture": Capture})
    return nodes


def pack_module():
    """The pack as ComfyUI imported it: its group registry is the one the nodes use."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["XDitUSPWanVideoModelLoader"]
    return sys.modules[cls.__module__.rsplit(".", 1)[0]]


# ------------------------------------------------------------------------------ benchmark nodes
CAPTURED: dict = {}


class Capture:
    """Output node: keeps the final latent and the decoded frames."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "images": ("IMAGE",)}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "keep"
    CATEGORY = "testing"

    def keep(self, samples, images):
        CAPTURED["latent"] = samples["samples"].detach().float().cpu().clone()
        CAPTURED["image"] = images.detach().float().cpu().clone()
        return {}


# --------------------------------------------------------------------------------- measurements
class Probe:
    """Per-graph timings (sampler steps) and worker forward stats, from patched hooks."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.reset()

    def reset(self):
        self.outer = []  # (start, end) of CFGGuider.outer_sample
        self.inner = []  # (start, end) of CFGGuider.inner_sample
        self.steps = []  # perf_counter at the end of each sampler step
        self.worker_peak: dict[int, int] = {}  # device (or rank) -> largest per-forward peak
        self.worker_ms = []
        self.owner_ms = []
        self.layouts = set()
        self.native_forwards = 0  # calls of native Wan's forward (ComfyUI's own model)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def install(self, launcher):
        import comfy.samplers

        probe = self
        guider = comfy.samplers.CFGGuider
        outer, inner = guider.outer_sample, guider.inner_sample

        def outer_sample(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return outer(self, *a, **k)
            finally:
                probe.sync()
                probe.outer.append((t0, time.perf_counter()))

        def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, *a, **k):
            probe.sync()
            t0 = time.perf_counter()

            def step(*args, **kw):
                probe.sync()
                probe.steps.append(time.perf_counter())
                if callback is not None:
                    return callback(*args, **kw)

            try:
                return inner(self, noise, latent_image, device, sampler, sigmas, denoise_mask, step, *a, **k)
            finally:
                probe.sync()
                probe.inner.append((t0, time.perf_counter()))

        guider.outer_sample, guider.inner_sample = outer_sample, inner_sample

        import comfy.ldm.wan.model

        wan = comfy.ldm.wan.model.WanModel
        native_forward = wan._forward  # inside the DIFFUSION_MODEL wrappers: a step a cache skips does not call it

        def counted_forward(self, *a, **k):  # our MODEL's proxy is not a WanModel: native graphs only
            probe.native_forwards += 1
            return native_forward(self, *a, **k)

        wan._forward = counted_forward

        wg = launcher.WorkerGroup
        forward = wg.forward

        def group_forward(self, key, inputs, stats=None):
            s = {} if stats is None else stats
            out = forward(self, key, inputs, stats=s)
            devs = self.config.visible_device_ids() if self.config.device == "cuda" else list(range(len(s["peak_bytes"])))
            for dev, peak in zip(devs, s.get("peak_bytes") or []):
                if peak is not None:
                    probe.worker_peak[dev] = max(probe.worker_peak.get(dev, 0), peak)
            probe.worker_ms.append(s["worker_ms"])
            probe.owner_ms.append(s["owner_ms"])
            probe.layouts.add(str(s.get("layout")))
            return out

        wg.forward = group_forward


class SmiSampler:
    """nvidia-smi memory.used (MiB) per GPU every `period` s in a thread: all processes together."""

    def __init__(self, period=0.2):
        self.period = period
        self.exe = shutil.which("nvidia-smi")
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = None

    def read(self) -> dict[int, int]:
        out = subprocess.run([self.exe, "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return {int(i): int(m) for i, m in (line.split(",") for line in out.strip().splitlines() if "," in line)}

    def start(self):
        if not self.exe:
            return self
        self.peak, self._stop = {}, threading.Event()

        def loop():
            while not self._stop.is_set():
                try:
                    for i, m in self.read().items():
                        self.peak[i] = max(self.peak.get(i, 0), m)
                except Exception:  # noqa: BLE001 - a missed sample is not an error
                    pass
                self._stop.wait(self.period)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[int, float]:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(10)
        return {i: m / 1024 for i, m in sorted(self.peak.items())}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ------------------------------------------------------------------------------- model files
def write_tiny(directory: str) -> str:
    from comfyui_xdit_usp.parallel import tiny

    path = os.path.join(directory, "wan_tiny_t2v_fp32.safetensors")
    if not os.path.exists(path):
        # ComfyUI's detection assumes text_dim 4096; the metadata tells it 64 (read by native and ours)
        tiny.write_original_checkpoint(tiny.build_model("t2v", seed=0), path,
                                       metadata={"config": json.dumps({"transformer": {"text_dim": TINY_TEXT_DIM}})})
    return path


def write_vae(directory: str, real: bool) -> str:
    """A random-weight Wan 2.1 VAE of ComfyUI's own class, as a file VAELoader detects (comfy.sd.VAE:
    `decoder.middle.0.residual.0.gamma` without Wan 2.2's keys; dim from decoder.head.0.gamma).
    real: dim 96 (the released Wan 2.1 VAE, ~127M parameters) in bf16; else dim 16 in fp32."""
    import comfy.ldm.wan.vae
    from safetensors.torch import save_file

    dim, dtype = (96, torch.bfloat16) if real else (16, torch.float32)
    path = os.path.join(directory, f"wan21_vae_dim{dim}_random.safetensors")
    if os.path.exists(path):
        return path
    vae = comfy.ldm.wan.vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], image_channels=3, conv_out_channels=3,
                                   dropout=0.0)
    g = torch.Generator().manual_seed(3)
    sd = {}
    for name, p in vae.state_dict().items():  # comfy ops leave weights uninitialized: draw them all
        if name.endswith("gamma"):
            t = torch.ones(p.shape)
        elif name.endswith("bias"):
            t = torch.zeros(p.shape)
        else:
            fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else p.shape[0]
            t = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
        sd[name] = t.to(dtype).contiguous()
    del vae
    save_file(sd, path)
    return path


# ------------------------------------------------------------------------------------- graphs
def build_graph(spec: dict, a, unet: str, vae: str) -> dict:
    w, h, f = a.size
    tokens, dim = (16, TINY_TEXT_DIM) if a.model == "tiny" else (512, 4096)
    p = {
        "ms": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["model", 0], "shift": 8.0}},
        "pos": {"class_type": "XDitBenchRandomConditioning", "inputs": {"seed": 1, "tokens": tokens, "dim": dim}},
        "neg": {"class_type": "XDitBenchRandomConditioning", "inputs": {"seed": 2, "tokens": tokens, "dim": dim}},
        "latent": {"class_type": "EmptyHunyuanLatentVideo",
                   "inputs": {"width": w, "height": h, "length": f, "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["ms", 0], "seed": SEED, "steps": a.steps, "cfg": spec["cfg"], "sampler_name": "euler",
            "scheduler": "simple", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "denoise": 1.0}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["vae", 0]}},
        "out": {"class_type": "XDitBenchCapture", "inputs": {"samples": ["ks", 0], "images": ["decode", 0]}},
    }
    mods = spec.get("mods", ())
    weight_dtype = "fp8_e4m3fn_fast" if "fp8" in mods else "default"
    model = ["model", 0]
    for m, node in (("tc", "TorchCompileModel"), ("ec", "EasyCache"), ("lc", "LazyCache")):
        if m in mods:  # in the order a user chains them: compile, then the cache
            extra = ({"backend": "inductor"} if m == "tc" else
                     {"reuse_threshold": 0.2, "start_percent": 0.15, "end_percent": 0.95, "verbose": False})
            p[m] = {"class_type": node, "inputs": {"model": model, **extra}}
            model = [m, 0]
    p["ms"]["inputs"]["model"] = model
    if spec["ours"]:
        p["cfg"] = {"class_type": "XDitUSPConfigNode", "inputs": dict(
            gpus=spec["gpus"], ulysses_degree=spec.get("ulysses", 0), ring_degree=0,
            cfg_degree=spec.get("cfg_degree", 0), dtype=a.dtype, attention_backend="auto", gpu_memory_fraction=1.0,
            device=a.device, weight_sharding="auto")}
        p["model"] = {"class_type": "XDitUSPWanVideoModelLoader",
                      "inputs": {"unet_name": unet, "weight_dtype": weight_dtype, "xdit_usp_config": ["cfg", 0]}}
    else:
        p["model"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": weight_dtype}}
    return p


def node_times(server, start: float, end: float) -> dict[str, float]:
    """Seconds per node: from its `executing` message to the next one (or the end)."""
    marks = [(t, d["node"]) for t, (e, d) in zip(server.times, server.messages)
             if e == "executing" and d.get("node") is not None]
    out = {}
    for i, (t, node) in enumerate(marks):
        nxt = marks[i + 1][0] if i + 1 < len(marks) else end
        out[node] = out.get(node, 0.0) + (nxt - t)
    return out


def free_all(pack, cuda: bool):
    import comfy.model_management as mm

    CAPTURED.clear()
    mm.unload_all_models()
    importlib.import_module(pack.__name__ + ".parallel").close_all_groups()
    gc.collect()
    mm.soft_empty_cache()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_graph(name: str, a, unet: str, vae: str, probe: Probe, pack) -> tuple[dict, torch.Tensor, torch.Tensor]:
    import execution

    spec = graph_spec(name)
    prompt = build_graph(spec, a, unet, vae)
    cuda = a.device == "cuda"
    devices = list(range(torch.cuda.device_count())) if cuda else []
    free_all(pack, cuda)
    for d in devices:
        torch.cuda.reset_peak_memory_stats(d)
    smi = SmiSampler()
    base = smi.read() if (cuda and smi.exe) else {}
    probe.reset()
    server = comfy_harness.ServerStub()
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})
    valid = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    if not valid[0]:
        raise RuntimeError(f"prompt failed validation: {valid[1]} {valid[3]}")
    smi.start()
    t0 = time.perf_counter()
    executor.execute(prompt, str(uuid.uuid4()), {"client_id": "bench"}, ["out"])
    t1 = time.perf_counter()
    smi_peak = smi.stop()
    errors = [d for e, d in server.messages if e == "execution_error"]
    if errors or not executor.success:
        e = errors[0] if errors else {}
        raise RuntimeError(f"{e.get('exception_type', '?')}: {e.get('exception_message', 'execution failed')}\n"
                           + "".join(e.get("traceback", [])))
    nt = node_times(server, t0, t1)
    (i0, i1), (o0, o1) = probe.inner[-1], probe.outer[-1]
    marks = [i0] + probe.steps
    per_step = [b - c for b, c in zip(marks[1:], marks[:-1])]
    row = {
        "graph": name, "desc": spec["desc"], "loader": "ours" if spec["ours"] else "native",
        "gpus": spec.get("gpus", 1), "cfg": spec["cfg"], "steps": a.steps,
        "layout": ",".join(sorted(probe.layouts)) or None,
        "step_s": statistics.median(per_step[1:]) if len(per_step) > 1 else per_step[0],
        "first_step_s": per_step[0], "per_step_s": per_step,
        "sampling_s": i1 - i0, "model_to_device_s": i0 - o0,
        "model_load_s": (nt.get("model") or 0.0) + (i0 - o0), "ksampler_node_s": nt.get("ks"),
        "loader_node_s": nt.get("model"), "vae_decode_s": nt.get("decode"), "vae_load_s": nt.get("vae"),
        "end_to_end_s": t1 - t0,
        "forwards": len(probe.worker_ms) if spec["ours"] else probe.native_forwards,
        "worker_forward_ms_median": statistics.median(probe.worker_ms) if probe.worker_ms else None,
        "owner_forward_ms_median": statistics.median(probe.owner_ms) if probe.owner_ms else None,
        "comfy_peak_gb": {d: torch.cuda.max_memory_allocated(d) / GB for d in devices},
        "worker_peak_gb": {d: b / GB for d, b in sorted(probe.worker_peak.items())},
        "smi_baseline_gb": {i: m / 1024 for i, m in sorted(base.items())},
        "smi_peak_gb": smi_peak,
    }
    if spec["ours"]:  # did ComfyUI keep the workers' model through VAE decode, and what do the ranks hold?
        remotes = importlib.import_module(pack.__name__ + ".xdit_usp_model").remote_models()
        row["worker_loads"] = sum(r.stats.loads for r in remotes)
        row["loaded_after_run"] = any(r.loaded for r in remotes)
        group = next((r.group for r in remotes if r.group is not None), None)
        if group is not None:
            try:
                row["worker_memory_after_gb"] = [
                    {"rank": m.rank, "device": m.device, "allocated": m.allocated / GB, "reserved": m.reserved / GB,
                     "trims": m.trims} for m in group.memory()]
            except Exception as e:  # noqa: BLE001 - a figure, not the result
                row["worker_memory_after_gb"] = f"{type(e).__name__}: {e}"
    latent, image = CAPTURED["latent"], CAPTURED["image"]
    row.update(latent_shape=list(latent.shape), image_shape=list(image.shape),
               latent_finite=bool(torch.isfinite(latent).all()), image_finite=bool(torch.isfinite(image).all()))
    del executor
    free_all(pack, cuda)
    return row, latent, image


# --------------------------------------------------------------------------------------- report
def _gb(d: dict) -> str:
    return " / ".join(f"{v:.1f}" for _, v in sorted(d.items())) if d else "-"


def table(rows: list[dict]) -> str:
    lines = ["| graph | loader | layout | cfg | s/step | sampling s | model load s | VAE decode s | end-to-end s | "
             "ComfyUI peak GB (per GPU) | worker peak GB (per GPU) | nvidia-smi peak GB (per GPU) | latent rel L2 vs ref | "
             "forwards | vs native with the same nodes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['graph']} | {r['desc']} | error: {r['error'][:80]} |" + " |" * 12)
            continue
        ref = (f"{r['latent_rel_l2']:.2e} (vs {r['ref']})" if r.get("latent_rel_l2") is not None
               else ("reference" if r.get("ref") is None else "no reference"))
        lines.append(
            f"| {r['graph']} | {r['desc']} | {r['layout'] or '-'} | {r['cfg']:g} | {r['step_s']:.3f} | "
            f"{r['sampling_s']:.1f} | {r['model_load_s']:.1f} | {r['vae_decode_s']:.1f} | {r['end_to_end_s']:.1f} | "
            f"{_gb(r['comfy_peak_gb'])} | {_gb(r['worker_peak_gb'])} | {_gb(r['smi_peak_gb'])} | {ref} | "
            f"{r.get('forwards') if r.get('forwards') is not None else '-'} | "
            + (f"{r['latent_rel_l2_vs_same']:.2e} (vs {r['ref_same']})" if "latent_rel_l2_vs_same" in r else "-") + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="1.3b", choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--graphs", default="a,b,c,a1,d", help="comma list of " + ",".join(GRAPHS))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dtype", default=None, help="Config dtype (default bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--vae", default="auto", choices=("auto", "real", "small"),
                    help="Wan 2.1 VAE of the real shape (dim 96, bf16) or a small one (dim 16); auto: small for tiny")
    ap.add_argument("--size", default=None, help="WxHxF instead of the model's default")
    ap.add_argument("--ckpt-dir", default=os.path.join(tempfile.gettempdir(), "xdit_usp_bench"))
    ap.add_argument("--comfyui-dir", default=None)
    a = ap.parse_args()
    a.dtype = a.dtype or ("fp32" if a.device == "cpu" else "bf16")
    a.size = tuple(int(v) for v in a.size.split("x")) if a.size else SIZES[a.model]
    names = [g for g in a.graphs.split(",") if g]
    specs = {}
    for g in names:
        try:
            specs[g] = graph_spec(g)
        except KeyError:
            raise SystemExit(f"unknown graph {g!r}: a base graph of {list(GRAPHS)}, optionally with modifiers "
                             f"joined by + from {list(MODIFIERS)} (e.g. c+tc+fp8+ec)") from None
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a GPU (use --device cpu to check on the CPU)")
    if cuda and any(specs[g].get("gpus", 1) > torch.cuda.device_count() for g in names):
        raise SystemExit(f"graphs {names} need 2 GPUs; {torch.cuda.device_count()} visible")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    os.makedirs(a.ckpt_dir, exist_ok=True)
    stubbed = _stub_av()
    directory = comfy_dir(a.comfyui_dir)
    import _common  # noqa: F401  (binds this checkout as comfyui_xdit_usp, for the checkpoint writers)

    nodes = boot(directory, cpu=not cuda)
    import folder_paths

    pack = pack_module()
    probe = Probe(cuda)
    probe.install(importlib.import_module(pack.__name__ + ".parallel.launcher"))

    t = time.perf_counter()
    if a.model == "tiny":
        unet_path = write_tiny(a.ckpt_dir)
    else:
        from bench_scaling import write_checkpoint

        unet_path = write_checkpoint(a.model, a.ckpt_dir)
    vae_path = write_vae(a.ckpt_dir, real=a.vae == "real" or (a.vae == "auto" and a.model != "tiny"))
    files_s = time.perf_counter() - t
    for kind in ("diffusion_models", "vae"):
        folder_paths.add_model_folder_path(kind, a.ckpt_dir, is_default=True)
    folder_paths.filename_list_cache.clear()

    try:
        import comfy.model_management as mm

        comfy_device = str(mm.get_torch_device())
    except Exception:  # noqa: BLE001
        comfy_device = "?"
    results = {
        "model": a.model, "size_wxhxf": list(a.size), "steps": a.steps, "device": a.device, "dtype": a.dtype,
        "gpu": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else "cpu",
        "torch": torch.__version__, "comfyui_dir": directory, "comfyui_device": comfy_device,
        "comfyui_commit": _comfy_commit(directory), "pack_commit": _git(REPO, "rev-parse", "HEAD"),
        "av_stubbed": stubbed, "checkpoint": os.path.basename(unet_path), "vae": os.path.basename(vae_path),
        "files_s": files_s, "date": time.strftime("%Y-%m-%d %H:%M"), "runs": [],
    }
    out_dir = os.environ.get("OUT") or "."
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, f"bench_comfyui_{a.model}.json")
    latents, images = {}, {}
    w, h, f = a.size
    tag = f"{a.model}_{w}x{h}x{f}_s{a.steps}_{a.device}_{a.dtype}"
    for name in names:
        spec = specs[name]
        print(f"\n=== graph {name}: {spec['desc']} (cfg {spec['cfg']:g}) ===", flush=True)
        try:
            row, latent, image = run_graph(name, a, os.path.basename(unet_path), os.path.basename(vae_path), probe,
                                           pack)
        except Exception as e:  # noqa: BLE001 - a graph that fails is a result to report
            logging.exception("graph %s failed", name)
            row = {"graph": name, "desc": spec["desc"], "error": f"{type(e).__name__}: {e}"[:2000]}
            free_all(pack, cuda)
        else:
            latents[name], images[name] = latent, image
            torch.save(latent, os.path.join(a.ckpt_dir, f"latent_{tag}_{name}.pt"))
            ref = spec["ref"]
            row["ref"] = ref
            same = spec.get("ref_same")
            if same is not None and same in latents:  # ours through the node vs native through the node
                row["ref_same"] = same
                row["latent_rel_l2_vs_same"] = rel_l2(latent, latents[same])
            if ref is not None:
                ref_latent, row["ref_source"] = latents.get(ref), "this run"
                ref_file = os.path.join(a.ckpt_dir, f"latent_{tag}_{ref}.pt")
                if ref_latent is None and os.path.exists(ref_file):
                    ref_latent, row["ref_source"] = torch.load(ref_file), ref_file
                if ref_latent is not None:
                    row["latent_rel_l2"] = rel_l2(latent, ref_latent)
                    row["latent_max_rel"] = max_rel(latent, ref_latent)
                    if ref in images:
                        row["image_rel_l2"] = rel_l2(image, images[ref])
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        with open(out_path, "w") as fh:
            json.dump(results, fh, indent=1)
    rows = results["runs"]
    by = {r["graph"]: r for r in rows}
    floor, c = by.get("b", {}).get("latent_rel_l2"), by.get("c", {}).get("latent_rel_l2")
    if floor is not None and c is not None:
        results["c_over_b"] = c / floor if floor > 0 else float("inf")
        results["c_within_2x_of_b"] = c <= 2 * floor
    with open(out_path, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"\n{a.model} {w}x{h}x{f}, {a.steps} steps, {results['gpu'] if cuda else 'CPU'}, Config dtype {a.dtype}")
    print(table(rows))
    if "c_over_b" in results:
        print(f"\n(c) vs native / (b) vs native (bf16 noise floor): {results['c_over_b']:.2f} "
              f"({'within' if results['c_within_2x_of_b'] else 'NOT within'} 2x)")
    print(f"results: {out_path}")
    nodes.NODE_CLASS_MAPPINGS.pop("XDitBenchCapture", None)
    return 1 if any("error" in r for r in rows) else 0


def _git(d, *args):
    try:
        return subprocess.run(["git", "-C", d, *args], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def _comfy_commit(d):
    marker = os.path.join(d, "COMFYUI_COMMIT")
    if os.path.exists(marker):
        with open(marker) as fh:
            return fh.read().strip()
    return _git(d, "rev-parse", "HEAD")


if __name__ == "__main__":
    sys.exit(main())
