"""The rank loop: one process per GPU (or CPU rank), started by torchrun from `launcher.py`.

Each rank connects to its owner over two authenticated loopback channels, requests and heartbeats,
and serves typed requests (`protocol.py`) with a `ModelRunner` (`runner.py`): load a model (by
key), run a forward, set a LoRA state, unload, report its memory (trimming the allocator's cache
first if asked), shut down. Every rank reads its inputs straight from the owner's shared-memory
arena; each group leader writes its rows of the output back. A rank exits when its owner process
is gone, its channel closes, or it is told to shut down.
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

from . import protocol as P
from . import transport
from .config import XDitUSPConfig
from .runner import ModelRunner
from .sp_vae import TORCH_DTYPES, VaeRunner, schedule_name


class Worker:
    def __init__(self):
        self.rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.config = XDitUSPConfig.from_json(os.environ["XDIT_USP_CONFIG"])
        self.owner_pid = int(os.environ["XDIT_USP_OWNER_PID"])
        self.fault = os.environ.get("XDIT_USP_FAULT", "")  # test hook, see _maybe_fault
        self.shm = transport.ShmReader()
        if self.config.device == "cuda":
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
            if self.config.gpu_memory_fraction < 1.0:
                torch.cuda.set_per_process_memory_fraction(self.config.gpu_memory_fraction, self.device)
        else:
            self.device = torch.device("cpu")
        self.runner = ModelRunner(self.config, self.device)
        self.vae = VaeRunner(self.device)
        self.after_reply: list = []  # callables run once the current reply is sent (_after_reply)
        self.handlers = {
            P.Ping: self.ping, P.Load: self.load, P.Unload: self.unload, P.Forward: self.forward,
            P.SetWeightPatches: self.set_weight_patches, P.Memory: self.memory,
            P.VaeLoad: self.vae_load, P.VaeDecode: self.vae_run, P.VaeEncode: self.vae_run,
            P.Uni3CLoad: self.uni3c_load, P.AudioLoad: self.audio_load,
        }

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
        conn = transport.connect(addr, authkey)
        conn.send(("requests", hello))
        beats = transport.connect(addr, authkey)
        beats.send(("heartbeat", hello))
        _start_heartbeat(beats, self.owner_pid)
        while True:
            try:
                wire = conn.recv()
            except (EOFError, OSError):
                break  # owner closed the channel
            try:
                request = P.decode(wire)
                if isinstance(request, P.Shutdown):
                    conn.send(P.encode(P.Done()))
                    break
                reply = self.handlers[type(request)](request)
            except BaseException as e:  # noqa: BLE001 - every failure goes back to the owner
                reply = P.Failed(rank=self.rank, type=type(e).__name__, message=str(e),
                                 traceback=traceback.format_exc(), time=time.monotonic())
            conn.send(P.encode(reply))
            self._after_reply()
        self.shm.close()
        try:
            dist.destroy_process_group()
        except Exception:
            pass

    def _after_reply(self):
        """Work a request left for after its reply (off the caller's wait; the next request waits
        for it, as this loop is serial): a trim whose gc.collect() alone takes ~0.25 s."""
        work, self.after_reply = self.after_reply, []
        for fn in work:
            try:
                fn()
            except Exception:  # noqa: BLE001 - housekeeping; the reply has gone, the next request reports
                traceback.print_exc()

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

    def _faults(self, stage: str):
        for kind in ("sleep", "exit", "raise", "stop"):
            self._maybe_fault(f"{stage}_{kind}")

    # ---- requests ---------------------------------------------------------------------------
    def ping(self, req: P.Ping) -> P.Pong:
        return P.Pong(rank=self.rank, models=sorted(self.runner.models))

    def load(self, req: P.Load) -> P.Loaded:
        from ..wan_to_xdit_mapping import CheckpointInfo

        self._faults("load")
        loaded = self.runner.load(req.key, req.path, CheckpointInfo(**req.info), req.placement)  # trims
        loaded.memory = self.memory_stats()
        return loaded

    def unload(self, req: P.Unload) -> P.Done:
        self.runner.unload(req.key)
        return P.Done()

    def forward(self, req: P.Forward) -> P.ForwardDone:
        t_start = time.perf_counter()
        cuda = self.device.type == "cuda"
        buf = self.shm.buf(req.arena, pin=cuda)
        inputs = P.ForwardInputs(**{name: transport.view(buf, spec) for name, spec in req.inputs.items()},
                                 control_hidden_states_scale=req.control_scale, skip_blocks=req.skip_blocks,
                                 rope_options=req.rope_options, uni3c=req.uni3c,
                                 audio_key=(req.audio or {}).get("key"), audio_scale=(req.audio or {}).get("scale", 1.0),
                                 compile=req.compile or self.config.compile)  # the one place this is decided
        self._faults("forward")
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        rows, result, layout = self.runner.forward(req.key, inputs)
        sync()
        t1 = time.perf_counter()
        if result is not None:  # group leader: write this batch slice into the owner's output
            target = transport.view(buf, req.out)[rows]
            target.copy_(result.to(target.dtype))
        t2 = time.perf_counter()
        return P.ForwardDone(ms=(t1 - t0) * 1e3, in_ms=(t0 - t_start) * 1e3, out_ms=(t2 - t1) * 1e3,
                             layout=layout, pinned=self.shm.pinned,
                             peak_bytes=torch.cuda.max_memory_allocated(self.device) if cuda else None,
                             memory=self.memory_stats(), compiled=inputs.compile,
                             stream_tokens=self.runner.stream_tokens(req.key))

    def uni3c_load(self, req: P.Uni3CLoad) -> P.Uni3CLoaded:
        buf = self.shm.buf(req.arena)
        tensors = {name: transport.view(buf, spec) for name, spec in req.tensors.items()}
        self.runner.uni3c_load(req.key, req.config, tensors)
        del tensors
        self.runner.trim()
        return P.Uni3CLoaded(param_bytes=self.runner.uni3c_param_bytes(), memory=self.memory_stats())

    def vae_load(self, req: P.VaeLoad) -> P.VaeLoaded:
        self._faults("vae_load")
        buf = self.shm.buf(req.arena)
        tensors = {name: transport.view(buf, spec) for name, spec in req.tensors.items()}
        load_s = self.vae.load(req.key, req.config, tensors, TORCH_DTYPES[req.dtype])
        del tensors
        self.runner.trim()
        return P.VaeLoaded(load_s=load_s, param_bytes=self.vae.param_bytes, memory=self.memory_stats())

    def audio_load(self, req: P.AudioLoad) -> P.Done:
        buf = self.shm.buf(req.arena)
        tensors = {name: transport.view(buf, spec) for name, spec in req.tensors.items()}
        self.runner.audio_load(req.key, tensors, req.num_heads, req.eps)  # copies out of the arena
        return P.Done()

    def vae_run(self, req) -> P.VaeDone:
        import resource

        cuda = self.device.type == "cuda"
        buf = self.shm.buf(req.arena, pin=cuda)
        self._faults("vae")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        # the rank writes its rows of the output into the arena itself, as they come (sp_vae._HostSink)
        rows = self.vae.run(req.key, isinstance(req, P.VaeEncode), transport.view(buf, req.input),
                            transport.view(buf, req.out), image=getattr(req, "image", False),
                            schedule=getattr(req, "schedule", ""))
        if cuda:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else None
        # the decode's activations go back to the GPU (for the transformer and others) after the reply,
        # without a gc pass (the VAE's code makes no reference cycles); the reply carries no memory
        # figures: they would be the ones before that trim
        self.after_reply.append(lambda: self.runner.trim(collect=False))
        return P.VaeDone(ms=ms, rows=[rows.start, rows.stop], peak_bytes=peak,
                         peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                         schedule="" if isinstance(req, P.VaeEncode) else schedule_name(self.vae.sp.pieces))

    def memory(self, req: P.Memory) -> P.MemoryStats:
        if req.trim:
            self.runner.trim()
        return self.memory_stats()

    def memory_stats(self) -> P.MemoryStats:
        """This rank's memory now: cheap (no synchronisation), so every load and forward reply carries it."""
        cuda = self.device.type == "cuda"
        return P.MemoryStats(
            rank=self.rank, device=self.device.index if cuda else -1,
            allocated=torch.cuda.memory_allocated(self.device) if cuda else 0,
            reserved=torch.cuda.memory_reserved(self.device) if cuda else 0,
            param_bytes=self.runner.param_bytes() + self.vae.param_bytes, trims=self.runner.trims)

    def set_weight_patches(self, req: P.SetWeightPatches) -> P.WeightsPatched:
        buf = self.shm.buf(req.arena) if req.arena else None
        patches = {name: [p.map_tensors(lambda spec: transport.view(buf, spec)) for p in items]
                   for name, items in req.patches.items()}
        patched = self.runner.set_weight_patches(req.key, patches)
        self.runner.trim()  # the fp32 merge temporaries
        return P.WeightsPatched(patched=patched)


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
