"""The rank loop: one process per GPU (or CPU rank), started by torchrun from `launcher.py`.

Each rank connects to its owner over the authenticated loopback channel and serves requests:
load a model (by key), run a forward, unload, shut down. Every rank reads its inputs from the
owner's shared-memory arena; each group leader writes its slice of the output back. A rank
exits when its owner process is gone, its channel closes, or it is told to shut down.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from . import transport
from .attention import SPGroup, build_sp_group, resolve_backend
from .config import XDitUSPConfig
from .sp_wan import SequenceParallelWan

# Modules diffusers keeps in fp32 (WanTransformer3DModel._keep_in_fp32_modules); we load them so.
FP32_MODULES = ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")


def _keep_fp32(name: str) -> bool:
    parts = name.split(".")
    return any(p in FP32_MODULES for p in parts)


def build_model(path: str, dtype: torch.dtype, device: torch.device):
    """diffusers Wan model with empty init, weights streamed from the checkpoint (mmap)."""
    import diffusers
    from accelerate import init_empty_weights

    from ..wan_to_xdit_mapping import iter_checkpoint

    info, tensors = iter_checkpoint(path)
    cls = getattr(diffusers, info.diffusers_class)
    with init_empty_weights():
        model = cls(**info.diffusers_config)
    base = {}
    for name, t in tensors:  # streamed: one tensor in host memory at a time
        target = torch.float32 if _keep_fp32(name) else dtype
        if t.dtype.is_floating_point and t.element_size() == 1:  # plain fp8: upcast via fp32
            t = t.float()
        base[name] = t.to(device=device, dtype=target)
    model.load_state_dict(base, strict=True, assign=True)
    model.to(device).eval().requires_grad_(False)
    return model, info


class _Model:
    def __init__(self, path: str, model, info, runner: SequenceParallelWan, layouts):
        self.path, self.model, self.info, self.runner, self.layouts = path, model, info, runner, layouts
        self.patched: set[str] = set()  # weights a LoRA has changed (restored from `path` before the next)


class Worker:
    def __init__(self):
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.config = XDitUSPConfig.from_json(os.environ["XDIT_USP_CONFIG"])
        self.owner_pid = int(os.environ["XDIT_USP_OWNER_PID"])
        self.fault = os.environ.get("XDIT_USP_FAULT", "")  # test hook, see _maybe_fault
        self.models: dict[str, _Model] = {}
        self.groups: dict[tuple, SPGroup] = {}
        self.shm = transport.ShmReader()
        if self.config.device == "cuda":
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            if self.config.gpu_memory_fraction < 1.0:
                torch.cuda.set_per_process_memory_fraction(self.config.gpu_memory_fraction, self.device)
        else:
            self.device = torch.device("cpu")
        self.dtype = self.config.torch_dtype()

    # ---- lifecycle --------------------------------------------------------------------------
    def run(self):
        backend = "nccl" if self.config.device == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            timeout=timedelta(seconds=max(self.config.forward_timeout_s, self.config.load_timeout_s) + 60),
            device_id=self.device if backend == "nccl" else None,
        )
        addr = json.loads(os.environ["XDIT_USP_ADDR"])
        authkey = bytes.fromhex(os.environ["XDIT_USP_AUTHKEY"])
        hello = {"rank": self.rank, "pid": os.getpid(), "device": str(self.device)}
        self.conn = transport.connect(addr, authkey)
        self.conn.send(("requests", hello))
        beats = transport.connect(addr, authkey)
        beats.send(("heartbeat", hello))
        _start_heartbeat(beats, self.owner_pid)
        while True:
            try:
                op, payload = self.conn.recv()
            except (EOFError, OSError):
                break  # owner closed the channel
            except Exception as e:  # an undecodable message: report it, keep serving
                self.conn.send(("error", self._error(e)))
                continue
            if op == "shutdown":
                self.conn.send(("ok", None))
                break
            try:
                result = getattr(self, "op_" + op)(**payload)
                self.conn.send(("ok", result))
            except BaseException as e:  # noqa: BLE001 - every failure goes back to the owner
                self.conn.send(("error", self._error(e)))
        self.shm.close()
        try:
            dist.destroy_process_group()
        except Exception:
            pass

    def _error(self, e: BaseException) -> dict:
        # `time` (CLOCK_MONOTONIC, the same clock in every process) lets the owner blame the rank
        # that failed first, whatever order the replies arrive in.
        return {"rank": self.rank, "type": type(e).__name__, "message": str(e),
                "traceback": traceback.format_exc(), "time": time.monotonic()}

    def _maybe_fault(self, where: str):
        # XDIT_USP_FAULT="<where>@<rank>[=<seconds>]": deliberate failures for the failure tests.
        # *_sleep sleeps that long (default an hour); *_exit and *_raise wait that long (default 0)
        # and then exit or raise; *_stop stops this process (SIGSTOP), as a debugger or a hung
        # driver would.
        for item in filter(None, self.fault.split(",")):
            spec, _, arg = item.partition("=")
            w, _, r = spec.partition("@")
            if w == where and int(r) == self.rank:
                print(f"injected fault {item}", flush=True)
                if where.endswith("sleep"):
                    time.sleep(float(arg or 3600))
                    continue
                time.sleep(float(arg or 0))
                if where.endswith("exit"):
                    os._exit(3)
                if where.endswith("raise"):
                    raise RuntimeError(f"injected fault {item}")
                if where.endswith("stop"):
                    os.kill(os.getpid(), signal.SIGSTOP)

    def _group(self, layout) -> SPGroup:
        key = (layout.cfg, layout.ulysses, layout.ring)
        if key not in self.groups:
            self.groups[key] = build_sp_group(*key)
        return self.groups[key]

    # ---- operations -------------------------------------------------------------------------
    def op_ping(self):
        return {"rank": self.rank, "models": sorted(self.models)}

    def op_load(self, key: str, path: str):
        t0 = time.perf_counter()
        for where in ("load_sleep", "load_exit", "load_raise"):
            self._maybe_fault(where)
        model, info = build_model(path, self.dtype, self.device)
        heads = model.config.num_attention_heads
        layouts = (self.config.resolve(heads), self.config.fallback_layout(heads))
        backend = resolve_backend(self.config.attention_backend, self.config.device, max(l.ring for l in layouts))
        for layout in layouts:
            self._group(layout)
        self.models[key] = _Model(path, model, info, SequenceParallelWan(model, backend), layouts)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return {
            "load_s": time.perf_counter() - t0,
            "backend": backend.name,
            "layout": str(layouts[0]),
            "fallback_layout": str(layouts[1]),
            "variant": info.variant,
            "num_heads": heads,
            "in_channels": model.config.in_channels,
            "out_channels": model.config.out_channels,
            "patch_size": list(model.config.patch_size),
            "memory_bytes": torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None,
        }

    def op_unload(self, key: str):
        self.models.pop(key, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return None

    def op_forward(self, key: str, arena: str, inputs: dict, out: tuple, control_scale=None):
        t_start = time.perf_counter()
        m = self.models.get(key)
        if m is None:
            raise KeyError(f"model {key!r} is not loaded on rank {self.rank}")
        buf = self.shm.buf(arena, pin=self.device.type == "cuda")
        x = {k: transport.view(buf, spec) for k, spec in inputs.items()}
        batch = x["hidden_states"].shape[0]
        layout = m.layouts[0] if batch % m.layouts[0].cfg == 0 else m.layouts[1]
        group = self._group(layout)
        per = batch // layout.cfg
        rows = slice(group.cfg_index * per, (group.cfg_index + 1) * per)

        def arg(name, dtype=None):
            t = x.get(name)
            if t is None:
                return None
            t = t[rows] if t.ndim and t.shape[0] == batch else t
            return t.to(self.device, dtype=dtype or self.dtype, non_blocking=True)

        args = [arg("hidden_states"), arg("timestep", torch.float32), arg("encoder_hidden_states"),
                arg("encoder_hidden_states_image"), arg("control_hidden_states")]
        for where in ("forward_sleep", "forward_exit", "forward_raise", "forward_stop"):
            self._maybe_fault(where)
        cuda = self.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        result = m.runner.forward(group, *args, control_scale)
        sync()
        t1 = time.perf_counter()
        if result is not None:  # group leader: write this batch slice into the owner's output
            target = transport.view(buf, out)[rows]
            target.copy_(result.to(target.dtype))
        t2 = time.perf_counter()
        return {"ms": (t1 - t0) * 1e3, "in_ms": (t0 - t_start) * 1e3, "out_ms": (t2 - t1) * 1e3,
                "layout": str(layout), "pinned": self.shm.pinned,
                "peak_bytes": torch.cuda.max_memory_allocated(self.device) if cuda else None}

    def op_lora(self, key: str, arena: str, patches: dict):
        """Set the LoRA state of model `key`: patches = {diffusers weight name: [item, ...]}, item =
        ("lora", up_spec, down_spec, scale) -> scale * up @ down (low-rank factors, merged here), or
        ("diff", delta_spec, scale) -> scale * delta. {} removes every LoRA.

        Weights patched before are first restored exactly from the checkpoint file (only those
        tensors, through the shared page cache), so no second copy of the weights is kept on the GPU
        and a strength change never reloads the whole model."""
        from ..wan_to_xdit_mapping import iter_checkpoint

        m = self.models[key]
        params = dict(m.model.named_parameters())
        unknown = [n for n in patches if n not in params]
        if unknown:
            raise KeyError(f"LoRA targets {unknown[:5]}, which the model does not have")
        if m.patched:
            _, originals = iter_checkpoint(m.path, only=m.patched)
            for name, t in originals:
                params[name].data.copy_(t.to(self.device, params[name].dtype))
            m.patched = set()
        buf = self.shm.buf(arena) if patches else None

        def load(spec):
            return transport.view(buf, spec).to(self.device, torch.float32)

        for name, items in patches.items():
            p = params[name]
            w = p.data.float()
            for item in items:
                if item[0] == "lora":
                    up, down = load(item[1]), load(item[2])
                    w += item[3] * (up.flatten(1) @ down.flatten(1)).reshape(p.shape)
                elif item[0] == "diff":
                    w += item[2] * load(item[1]).reshape(p.shape)
                else:
                    raise ValueError(f"unknown LoRA patch kind {item[0]!r} for {name}")
            p.data.copy_(w.to(p.dtype))
            m.patched.add(name)
        return {"patched": len(patches)}


HEARTBEAT_S = 0.5


def _start_heartbeat(beats, owner_pid: int):
    """Tell the owner twice a second that this rank is alive, from a thread of its own, so a long
    forward still beats and a hung or stopped rank falls silent. Exit when the owner dies or
    torchrun's agent (our parent) does: no orphan workers."""
    parent = os.getppid()

    def beat():
        while True:
            gone = os.getppid() != parent
            try:
                os.kill(owner_pid, 0)
            except ProcessLookupError:
                gone = True
            except PermissionError:
                pass
            try:
                beats.send(None)
            except OSError:
                gone = True
            if gone:
                os._exit(1)
            time.sleep(HEARTBEAT_S)

    threading.Thread(target=beat, name="xdit-usp-heartbeat", daemon=True).start()


def main():
    import faulthandler

    log_dir = os.environ.get("XDIT_USP_LOG_DIR")
    if log_dir:
        path = os.path.join(log_dir, f"rank{os.environ.get('RANK', 'x')}.log")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    faulthandler.enable()
    Worker().run()
