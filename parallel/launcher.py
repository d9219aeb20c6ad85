"""Start, use and stop a warm torchrun worker group from the owner process.

    group = WorkerGroup(XDitUSPConfig(world_size=4))
    info = group.load("high", "/models/wan2.2_t2v_high_noise_14B_fp16.safetensors")
    out = group.forward("high", hidden_states=x, timestep=t, encoder_hidden_states=ctx)
    group.close()

The group is started lazily by the first `load`, stays warm across calls, and holds several
models by key (the Wan 2.2 high/low-noise experts). Every wait has a timeout; any failure names
the rank and carries the tail of its log; the group is torn down on `close()`, at interpreter exit,
and (from the workers' side) when the owner process dies.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing import connection as mpc
from typing import Optional

import torch

from . import protocol as P
from . import reaper, transport
from .config import ConfigError, XDitUSPConfig

PARALLEL_DIR = os.path.dirname(os.path.abspath(__file__))
ENTRY = os.path.join(PARALLEL_DIR, "_entry.py")
TORCHRUN = os.path.join(PARALLEL_DIR, "_torchrun.py")  # torchrun, its store on 127.0.0.1 only
# NVLink SHARP / multicast stay off wherever we set NCCL's environment: a program using NVLink multicast
# can take a shared host's GPUs out of service (and is not needed for these collectives).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# Every socket of a single-host group binds loopback: gloo's pairs and NCCL's bootstrap by interface.
LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
# The workers' CUDA caching allocator maps memory in growable segments instead of fixed blocks, so
# less of what it reserves is fragmentation slack, and empty_cache() gives back more (issue 12: a
# rank showed 8.5 GB in nvidia-smi for 4.2 GB of tensors). Set unless the user set the variable.
# Safe with NCCL in torch >= 2.2; its one known limit, CUDA IPC of tensors between processes, is
# not used here (inputs and outputs cross through host shared memory).
CUDA_ALLOC_ENV = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
# With the exchange overlapped (config.comm_overlap on or auto), NCCL's kernels run on high-priority streams:
# the GPU's block scheduler then gives a free SM to a pending NCCL block before the next block of an
# attention kernel launched earlier, instead of starting the transfer only when that kernel has no
# blocks left to dispatch. Set unless the user set the variable.
OVERLAP_ENV = {"TORCH_NCCL_HIGH_PRIORITY": "1"}
GRACE_S = 2.0  # after one rank reports an error, how long the others get to report theirs


def allocator_env(config: XDitUSPConfig, env: dict) -> dict:
    """What to add to the workers' environment `env` for their CUDA caching allocator: nothing for
    CPU ranks or when PYTORCH_CUDA_ALLOC_CONF is set already (the user's choice wins)."""
    if config.device != "cuda" or "PYTORCH_CUDA_ALLOC_CONF" in env:
        return {}
    return dict(CUDA_ALLOC_ENV)


class WorkerError(RuntimeError):
    """A worker failed; `.rank` names the rank that failed first (None: torchrun's agent) and the
    message carries its traceback or log tail."""

    def __init__(self, message: str, rank: Optional[int] = None):
        super().__init__(message)
        self.rank = rank


@dataclass(order=True)
class _Failure:
    """One thing that went wrong, ordered by when it happened (CLOCK_MONOTONIC is system-wide)."""

    time: float
    rank: int  # -1: torchrun's agent
    kind: str = field(compare=False)  # raised | exited | silent | agent
    detail: dict = field(compare=False, default_factory=dict)


def _tail(path: str, n: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().decode(errors="replace").splitlines()[-n:]
        return "\n".join("    " + ln for ln in lines)
    except OSError:
        return "    (no log)"


_PROC_STATES = {"T": "stopped by a signal", "t": "stopped by a debugger", "D": "in uninterruptible I/O",
                "R": "running", "S": "sleeping", "Z": "exited"}


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            code = f.read().rsplit(")", 1)[1].split()[0]
        return _PROC_STATES.get(code, code)
    except OSError:
        return "gone"


class _Liveness:
    """The owner's side of the heartbeats. A thread reads every rank's heartbeat channel and notes
    when each rank was last heard, when a channel closed (that rank died) and when torchrun's agent
    exited, so a dead, hung or stopped rank is known within `heartbeat_timeout_s`, independent of how
    long a forward takes."""

    def __init__(self, beats: list, proc: subprocess.Popen):
        now = time.monotonic()
        self.proc = proc
        self.last = [now] * len(beats)
        self.died: dict[int, float] = {}
        self.agent_exit: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(dict(zip(beats, range(len(beats)))),),
                                        name="xdit-usp-liveness", daemon=True)
        self._thread.start()

    def _run(self, live: dict):
        while not self._stop.is_set():
            if live:
                ready = mpc.wait(list(live), timeout=0.1)
            else:
                ready = []
                self._stop.wait(0.1)
            now = time.monotonic()
            for c in ready:
                r = live[c]
                try:
                    c.recv()
                    self.last[r] = now
                except (EOFError, OSError):
                    self.died.setdefault(r, now)
                    del live[c]
                    c.close()
            if self.agent_exit is None and self.proc.poll() is not None:
                self.agent_exit = now
        for c in live:
            c.close()

    def failures(self, silent_after: float) -> list[_Failure]:
        now = time.monotonic()
        out = [_Failure(t, r, "exited") for r, t in self.died.items()]
        out += [_Failure(t, r, "silent") for r, t in enumerate(self.last)
                if r not in self.died and now - t > silent_after]
        if self.agent_exit is not None:
            out.append(_Failure(self.agent_exit, -1, "agent"))
        return sorted(out)

    def stop(self):
        self._stop.set()
        self._thread.join(2.0)


_live_groups: "weakref.WeakSet[WorkerGroup]" = weakref.WeakSet()


@atexit.register
def _close_all():
    for g in list(_live_groups):
        g.close(graceful=False)


class WorkerGroup:
    def __init__(self, config: XDitUSPConfig, env: Optional[dict] = None):
        self.config = config.validate()
        self.env = dict(env or {})
        self.proc: Optional[subprocess.Popen] = None
        self.conns: list[mpc.Connection] = []
        self.pids: list[int] = []
        self.models: dict[str, P.Loaded] = {}
        self._infos: dict = {}  # key -> CheckpointInfo of each loaded model (for the memory plan)
        self._sizes_checked: set = set()  # (key, input shape, Uni3C on, audio on) the memory plan was checked for
        # Each rank's memory as last reported (after a load, a forward or memory()); None when
        # unknown or stale (after an unload). The owner's figures: reading them costs no round trip.
        self.memory_stats: Optional[list[P.MemoryStats]] = None
        self.forward_peaks: dict[str, list] = {}  # key -> each rank's peak_bytes in its last forward
        self.vae: Optional[tuple] = None  # (key, VaeInfo, VaeLoaded) of the VAE the ranks hold (one at a time)
        self.uni3c: Optional[tuple] = None  # (key, config, param bytes a rank holds) of the Uni3C net the ranks hold (one at a time)
        self.audio: Optional[str] = None  # key of the audio patch weights the ranks hold (one at a time)
        self.audio_bytes = 0  # what those weights take on each rank (every rank holds them whole)
        self.log_dir: Optional[str] = None
        self.arena = transport.ShmArena()
        self.launches = 0
        self._liveness: Optional[_Liveness] = None
        self._lock = threading.RLock()

    # ---- lifecycle --------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return (self.proc is not None and self.proc.poll() is None and self._liveness is not None
                and not self._liveness.failures(self.config.heartbeat_timeout_s))

    def start(self):
        with self._lock:
            if self.alive:
                return
            self.close(graceful=False)
            cfg = self.config
            cfg.validate()  # device count, now that we are about to use the devices
            # One folder per launch holds the logs and is TMPDIR for torchrun and the workers (its
            # torchelastic_* folders land here): removed on close, or by the reaper if we die first.
            self.log_dir = tempfile.mkdtemp(prefix="xdit_usp_logs_")
            reaper.track("path", self.log_dir)
            os.mkdir(os.path.join(self.log_dir, "tmp"))
            authkey = transport.new_authkey()
            listener = transport.ControlListener(authkey)
            env = dict(os.environ)
            env.update(NCCL_ENV)
            env.update(LOOPBACK_ENV)
            env.update(cfg.extra_env)
            env.update(self.env)
            env.update(allocator_env(cfg, env))
            if cfg.device == "cuda" and cfg.comm_overlap != "off":
                env.update({k: v for k, v in OVERLAP_ENV.items() if k not in env})
            env.update(
                XDIT_USP_ADDR=json.dumps(list(listener.address)),
                XDIT_USP_AUTHKEY=authkey.hex(),
                XDIT_USP_OWNER_PID=str(os.getpid()),
                XDIT_USP_CONFIG=cfg.to_json(),
                XDIT_USP_LOG_DIR=self.log_dir,
                TMPDIR=os.path.join(self.log_dir, "tmp"),
                PYTHONUNBUFFERED="1",
            )
            if cfg.device == "cuda":
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                ids = cfg.visible_device_ids()
                if visible:
                    parent = [v.strip() for v in visible.split(",") if v.strip()]
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(parent[i] for i in ids)
                else:
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in ids)
            else:
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.world_size)))
            cmd = [
                sys.executable, TORCHRUN, "--nnodes=1", f"--nproc-per-node={cfg.world_size}",
                "--max-restarts=0", "--monitor-interval=0.5", ENTRY,
            ]
            agent_log = open(os.path.join(self.log_dir, "torchrun.log"), "wb")
            self.proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=agent_log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: Ctrl-C is ours to handle, and we kill the tree
            )
            reaper.track("pgid", self.proc.pid)
            agent_log.close()
            self.launches += 1
            _live_groups.add(self)
            try:
                self._handshake(listener, cfg.launch_timeout_s)
            except BaseException:
                self.close(keep_logs=True, graceful=False)
                raise
            finally:
                listener.close()

    def _handshake(self, listener: transport.ControlListener, timeout: float):
        """Every rank opens two authenticated connections: requests, and heartbeats."""
        n = self.config.world_size
        conns: dict[int, mpc.Connection] = {}
        beats: dict[int, mpc.Connection] = {}
        pids: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        while len(conns) < n or len(beats) < n:
            if self.proc.poll() is not None:
                raise WorkerError(
                    f"worker group exited (code {self.proc.returncode}) before all {n} ranks connected "
                    f"({sorted(conns)} did).\n" + self._logs()
                )
            if time.monotonic() > deadline:
                raise WorkerError(
                    f"worker group did not start within {timeout:.0f}s: ranks {sorted(conns)} of {n} connected.\n"
                    + self._logs()
                )
            conn = listener.accept(0.2)
            if conn is None:
                continue
            try:
                channel, hello = transport.recv(conn, 2.0)
            except (TimeoutError, EOFError, OSError):
                conn.close()
                continue
            (beats if channel == "heartbeat" else conns)[hello["rank"]] = conn
            if hello["pid"] not in pids.values():
                pids[hello["rank"]] = hello["pid"]
                reaper.track("pgid", hello["pid"])  # torchrun starts each worker in a session of its own
        self.conns = [conns[r] for r in range(n)]
        self.pids = [pids[r] for r in range(n)]
        self._liveness = _Liveness([beats[r] for r in range(n)], self.proc)

    def close(self, keep_logs: bool = False, graceful: bool = True):
        """Stop every worker and free the shared memory. `graceful` asks the ranks to exit and waits
        up to 10 s before signals; otherwise (a broken group, Ctrl-C, exit) they are killed at once.
        The log folder is removed unless `keep_logs` (failures keep it while this process lives:
        their error message names it)."""
        with self._lock:
            proc, self.proc = self.proc, None
            if proc is not None and graceful:
                for c in self.conns:
                    try:
                        c.send(P.encode(P.Shutdown()))
                    except OSError:
                        pass
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            if self._liveness is not None:
                self._liveness.stop()
                self._liveness = None
            for pgid in ([proc.pid] if proc is not None else []) + self.pids:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                reaper.untrack("pgid", pgid)
            if proc is not None:
                proc.wait()
            for c in self.conns:
                c.close()
            self.conns, self.pids, self.models = [], [], {}
            self._infos, self._sizes_checked = {}, set()
            self.memory_stats, self.forward_peaks = None, {}
            self.vae = self.audio = None
            self.audio_bytes = 0
            self.uni3c = None
            self.arena.close()
            if self.log_dir and not keep_logs and proc is not None:
                shutil.rmtree(self.log_dir, ignore_errors=True)
                reaper.untrack("path", self.log_dir)
            _live_groups.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(graceful=exc_type is None)

    # ---- requests ---------------------------------------------------------------------------
    def _logs(self, ranks=None) -> str:
        if not self.log_dir:
            return ""
        ranks = range(self.config.world_size) if ranks is None else ranks
        parts = [f"  torchrun:\n{_tail(os.path.join(self.log_dir, 'torchrun.log'), 15)}"]
        for r in ranks:
            p = os.path.join(self.log_dir, f"rank{r}.log")
            if os.path.exists(p) and os.path.getsize(p):
                parts.append(f"  rank {r} log:\n{_tail(p)}")
        return "logs (" + self.log_dir + "):\n" + "\n".join(parts)

    def _describe(self, f: _Failure, op: str, first: bool, started: float) -> str:
        # A silent rank's time is its last heartbeat: it fell silent before the call only if it
        # was already past the timeout then.
        known_at = f.time + self.config.heartbeat_timeout_s if f.kind == "silent" else f.time
        when = f"during {op!r}" if known_at >= started else f"before {op!r} (while idle)"
        if f.kind == "raised":
            text = f"rank {f.rank} failed in {op!r}: {f.detail['type']}: {f.detail['message']}"
            return text + ("\n" + f.detail["traceback"] if first and f.detail.get("traceback") else "")
        if f.kind == "agent":
            return f"torchrun's agent (pid {f.detail['pid']}) exited ({f.detail['how']}) {when}; its workers stop with it"
        pid = self.pids[f.rank]
        if f.kind == "exited":
            return f"rank {f.rank} (pid {pid}) exited {when}"
        return (f"rank {f.rank} (pid {pid}) stopped responding {when}: no heartbeat for "
                f"{self.config.heartbeat_timeout_s:g}s (process: {_proc_state(pid)})")

    def _call(self, request, timeout: float) -> list:
        """Send one request to every rank and collect every reply. A rank that raises, dies, hangs
        or is stopped, or torchrun's agent dying, fails the call within seconds (the heartbeat
        timeout), naming what failed first; a call that simply runs longer than `timeout` fails too."""
        if self.proc is None or self._liveness is None:
            raise WorkerError("the worker group is not running (it was closed or a worker died); it restarts on the next load")
        op = type(request).__name__.lower()  # "load", "forward", ... in messages
        wire = P.encode(request)
        started = time.monotonic()
        closed: set[int] = set()
        for r, c in enumerate(self.conns):
            try:
                c.send(wire)
            except OSError:
                closed.add(r)  # the rank is gone: its heartbeat channel says when (below)
        replies: dict[int, object] = {}
        raised: dict[int, _Failure] = {}
        pending = {c: r for r, c in enumerate(self.conns)}
        deadline = time.monotonic() + timeout
        lost = self._liveness.failures(self.config.heartbeat_timeout_s)  # a rank may have died while idle
        while pending and not lost:
            if raised:  # give the others a moment to report too, then stop waiting
                deadline = min(deadline, min(f.time for f in raised.values()) + GRACE_S)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for c in mpc.wait([c for c, r in pending.items() if r not in closed], timeout=min(left, 0.2)):
                try:
                    reply = P.decode(c.recv())
                except (EOFError, OSError):
                    closed.add(pending[c])  # the rank died: its heartbeat channel says when (below)
                    continue
                r = pending.pop(c)
                if isinstance(reply, P.Failed):
                    raised[r] = _Failure(reply.time, r, "raised", dataclasses.asdict(reply))
                else:
                    replies[r] = reply
            lost = self._liveness.failures(self.config.heartbeat_timeout_s)
        if not (raised or pending):
            return [replies[r] for r in range(self.config.world_size)]
        failures = sorted(list(raised.values()) + lost)
        for f in failures:
            if f.kind == "agent":
                code = self.proc.returncode if self.proc is not None else None
                how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                f.detail.update(pid=self.proc.pid if self.proc is not None else "?", how=how)
        if failures:
            first = failures[0]
            msg = self._describe(first, op, True, started)
            later = [self._describe(f, op, False, started) for f in failures[1:]]
            if later:
                msg += "\nthen: " + "\nthen: ".join(ln.splitlines()[0] for ln in later)
        else:
            first = _Failure(0.0, min(pending.values()), "timeout")
            msg = f"{op!r} timed out after {timeout:.0f}s waiting for rank(s) {sorted(pending.values())}"
        rank = None if first.rank < 0 else first.rank
        if pending or lost:  # a dead or stuck rank: the group can't be trusted; next load relaunches
            self.close(keep_logs=True, graceful=False)
            msg += "\n" + self._logs(None if rank is None else [rank]) + "\nThe worker group was shut down; it restarts on the next run."
        raise WorkerError(msg, rank=rank)

    def load(self, key: str, path: str, latent: Optional[tuple[int, int, int]] = None, batch: int = 2) -> P.Loaded:
        """Load a checkpoint on every rank under `key` (starting the group if needed).

        The memory plan (parallel/memory.py) is made first, in this process, from the header: it
        resolves weight_sharding "auto" and refuses a model that will not fit next to the models
        already loaded, saying what would. `latent` (frames, height, width) and `batch`: the video
        size to plan for, when the caller knows it (the CLI does; ComfyUI learns it at the first step)."""
        with self._lock:
            from ..wan_to_xdit_mapping import inspect_checkpoint
            from .memory import card_bytes, estimate, plan_load, standard_latent

            if not os.path.exists(path):
                raise FileNotFoundError(f"checkpoint not found: {path}")
            info = inspect_checkpoint(path)  # a bad file fails here, before any worker is involved
            self.config.plan(info.num_heads)  # and so does a layout or kernel that cannot run it
            layers = info.diffusers_config.get("num_layers", 0)
            if self.config.pipeline_parallel_degree > layers:
                raise ConfigError(f"pipeline_parallel_degree {self.config.pipeline_parallel_degree} is more than the "
                                  f"{layers} blocks of this model (each stage holds at least one); use at most {layers}")
            resident = sum(m.param_bytes for k, m in self.models.items() if k != key)
            plan = plan_load(info, self.config, card_bytes(self.config), latent, batch, resident)
            self.start()
            path = os.path.abspath(path)
            replies: list[P.Loaded] = self._call(P.Load(key, path, dataclasses.asdict(info), plan.placement),
                                                 self.config.load_timeout_s)
            # This model's peak on a rank, for those who make room for it (ComfyUI): the plan's when it
            # was made for a video size, else at the model's standard size.
            sized = plan if plan.activation_bytes else estimate(info, self.config, plan.placement,
                                                                standard_latent(info)[0], batch)
            loaded = dataclasses.replace(replies[0], param_bytes=max(r.param_bytes for r in replies),
                                         param_bytes_per_rank=[r.param_bytes for r in replies],
                                         memory_plan=plan.as_dict(), peak_estimate=sized.peak_bytes - sized.resident_bytes,
                                         memory=None)
            self.models[key] = loaded
            self._infos[key] = info
            self._note_memory([r.memory for r in replies])
            return loaded

    def unload(self, key: str):
        with self._lock:
            if key in self.models and self.alive:
                self._call(P.Unload(key), 60)
            self.models.pop(key, None)
            self._infos.pop(key, None)
            self.forward_peaks.pop(key, None)
            self.memory_stats = None  # stale: memory() asks again

    def memory(self, trim: bool = False) -> list[P.MemoryStats]:
        """Every rank's memory (`MemoryStats`, device in this process's CUDA numbering). `trim`:
        each rank first gives back what its caching allocator holds unused (gc.collect() and
        torch.cuda.empty_cache(); on the CPU only the collection), and reports after. Raises
        WorkerError like every request when the group is not running or a rank is lost."""
        with self._lock:
            return self._note_memory(self._call(P.Memory(trim=trim), 60))

    def _note_memory(self, stats: list) -> Optional[list[P.MemoryStats]]:
        if any(s is None for s in stats):
            return None
        ids = self.config.visible_device_ids()
        self.memory_stats = [dataclasses.replace(s, device=ids[s.device]) if s.device >= 0 else s for s in stats]
        return self.memory_stats

    def set_weight_patches(self, key: str, patches: dict[str, list[P.WeightPatch]]) -> P.WeightsPatched:
        """Replace the weight patches of model `key` ({diffusers weight name: [WeightPatch with
        torch tensors]}, ComfyUI's order; {} restores the file's weights): applied on the workers
        to the weights each rank holds, base weights re-read from the file, never reloaded. Only
        the patches' own tensors cross the process boundary (LoRA factors, not their product; for
        a merge with a checkpoint the workers can read, no tensor at all), in fp32."""
        with self._lock:
            if key not in self.models:
                raise KeyError(f"no model loaded under {key!r}")
            tensors = {}

            def stage(t):
                name = f"t{len(tensors)}"
                tensors[name] = t.detach().float().contiguous()
                return name

            staged = {}
            for name, items in patches.items():
                for p in items:
                    if p.kind not in P.WeightPatch.KINDS:
                        raise ValueError(f"{name}: unknown weight patch kind {p.kind!r}; known: {P.WeightPatch.KINDS}")
                staged[name] = [p.map_tensors(stage) for p in items]
            written, _ = self.arena.pack(tensors, {})
            request = P.SetWeightPatches(key, self.arena.name if tensors else "", {
                name: [p.map_tensors(written.__getitem__) for p in items] for name, items in staged.items()})
            return self._call(request, self.config.load_timeout_s)[0]

    def forward(self, key: str, inputs: P.ForwardInputs, stats: Optional[dict] = None) -> torch.Tensor:
        """One transformer forward of model `key` on the group.

        Returns [B, out_channels, frames, height, width] in hidden_states' dtype, on the CPU."""
        with self._lock:
            info = self.models.get(key)
            if info is None:
                raise KeyError(f"no model loaded under {key!r} (loaded: {sorted(self.models)})")
            if inputs.compile and self.config.tensor_parallel_degree > 1:
                raise ConfigError(
                    "torch.compile (TorchCompileModel on this MODEL) is not supported with tensor_parallel_degree > 1: "
                    "its collectives run inside the compiled block functions. Remove the TorchCompileModel node, or "
                    "use pipeline_parallel_degree, fsdp or the sequence layouts with it")
            self._check_inputs(info, inputs)
            if inputs.uni3c is not None:
                self._check_uni3c(info, inputs)
            self._check_audio(info, inputs)
            self._check_memory(key, inputs)
            x, t = inputs.hidden_states, inputs.timestep
            b, _, f, h, w = x.shape
            t = t.reshape(-1) if t.ndim == 0 else t
            if t.shape[0] == 1 and b > 1:
                t = t.expand(b, *t.shape[1:])
            tensors = dict(inputs.tensors(), timestep=t)
            wire = self.config.torch_dtype()  # the workers compute in it: send and receive in it
            dtypes = {k: (torch.float32 if k == "timestep" else wire) for k in tensors}
            t0 = time.perf_counter()
            specs, reserved = self.arena.pack(tensors, {"out": ((b, info.out_channels, f, h, w), wire)}, dtypes)
            t1 = time.perf_counter()
            scale = inputs.control_hidden_states_scale
            if scale is not None:
                scale = torch.as_tensor(scale, dtype=torch.float32).flatten().tolist()
            skip = sorted({int(i) for i in inputs.skip_blocks}) if inputs.skip_blocks else None
            rope = {k: float(v) for k, v in inputs.rope_options.items() if k in P.ROPE_OPTIONS} \
                if inputs.rope_options else None
            uni3c = audio = None
            if inputs.uni3c is not None:
                uni3c = {"key": str(inputs.uni3c["key"]), "strength": float(inputs.uni3c.get("strength", 1.0))}
            if inputs.audio_key is not None:
                audio = {"key": inputs.audio_key, "scale": float(inputs.audio_scale)}
            request = P.Forward(key, self.arena.name, specs, reserved["out"], scale, skip, rope or None,
                                bool(inputs.compile), uni3c=uni3c, audio=audio)
            replies: list[P.ForwardDone] = self._call(request, self.config.forward_timeout_s)
            t2 = time.perf_counter()
            self._note_memory([r.memory for r in replies])
            self.forward_peaks[key] = [r.peak_bytes for r in replies]
            out = self.arena.read(reserved["out"], x.dtype)
            if stats is not None:
                t3 = time.perf_counter()
                stats.update(
                    owner_ms=(t3 - t0) * 1e3, pack_ms=(t1 - t0) * 1e3, read_ms=(t3 - t2) * 1e3,
                    worker_ms=max(r.ms for r in replies), worker_in_ms=max(r.in_ms for r in replies),
                    worker_out_ms=max(r.out_ms for r in replies), layout=replies[0].layout,
                    pinned=replies[0].pinned, peak_bytes=[r.peak_bytes for r in replies],
                    compiled=replies[0].compiled, stream_tokens=[r.stream_tokens for r in replies],
                )
            return out

    # ---- Uni3C camera control (parallel/uni3c.py) -------------------------------------------------
    def uni3c_load(self, state_dict: dict, key: Optional[str] = None) -> str:
        """Hold the Uni3C control net `state_dict` (ComfyUI's names, as ModelPatchLoader builds it;
        any device) on every rank, replicated, in the group's compute dtype (the patch embedding in
        fp32, as ComfyUI keeps it); returns its key. The weights cross once: when the ranks hold this
        key already, nothing is sent. `key`: `uni3c_key` of the same weights, when the caller has it."""
        from .uni3c import UNUSED_PREFIXES, config_from_state_dict

        with self._lock:
            tensors = {k: v for k, v in state_dict.items() if not k.startswith(UNUSED_PREFIXES)}
            try:
                config = config_from_state_dict(tensors)
            except KeyError as e:
                raise ValueError(f"not a Uni3C control net state dict (missing {e})") from None
            key = key or uni3c_key(tensors)
            if self.uni3c is not None and self.uni3c[0] == key and self.alive:
                return key
            self.start()
            wire = self.config.torch_dtype()
            dtypes = {k: (torch.float32 if k.startswith("controlnet_patch_embedding.") else wire) for k in tensors}
            specs, _ = self.arena.pack(tensors, {}, dtypes)
            replies: list[P.Uni3CLoaded] = self._call(P.Uni3CLoad(key, self.arena.name, specs, config),
                                                      self.config.load_timeout_s)
            self.uni3c = (key, config, replies[0].param_bytes)
            self._note_memory([r.memory for r in replies])
            return key

    def _check_uni3c(self, info: P.Loaded, inputs: P.ForwardInputs):
        """Uni3C's refusals, before any rank runs: a net that is not loaded, placements it does not
        support, a Ulysses degree its heads do not divide, a control input that is not the video's grid."""
        key = inputs.uni3c.get("key")
        if self.uni3c is None or self.uni3c[0] != key:
            raise KeyError(f"Uni3C control net {key!r} is not loaded on this group (uni3c_load it first)")
        config = self.uni3c[1]
        c = self.config
        if c.pipeline_parallel_degree > 1 or c.tensor_parallel_degree > 1:
            raise ConfigError(
                "Uni3C (WanUni3CControlnetApply) is not supported with pipeline_parallel_degree or tensor_parallel_degree "
                "> 1 (its control blocks would need their own stage / head split); use the sequence layouts (Ulysses, "
                "ring, CFG split) with replicated or fsdp weights")
        heads = config["num_heads"]
        layouts = (info.layout, info.fallback_layout)
        bad = sorted({lay.ulysses for lay in layouts if heads % lay.ulysses})
        if bad:
            raise ConfigError(
                f"Uni3C's control network has {heads} heads, which Ulysses degree {bad[0]} of this Config does not "
                f"divide; set ulysses_degree to one of {[d for d in range(1, heads + 1) if heads % d == 0]} (ring_degree "
                "takes the rest)")
        x, u = inputs.hidden_states, inputs.uni3c_input
        if tuple(info.patch_size) != (1, 2, 2):
            raise ValueError(f"Uni3C needs a Wan model with patch size (1, 2, 2); this one has {tuple(info.patch_size)}")
        if u is None or u.ndim != 5 or tuple(u.shape[2:]) != tuple(x.shape[2:]) or u.shape[1] != config["in_channels"] \
                or x.shape[0] % u.shape[0]:
            raise ValueError(f"uni3c_input must be [n, {config['in_channels']}, {', '.join(map(str, x.shape[2:]))}] with n "
                             f"dividing the batch {x.shape[0]}; got {None if u is None else tuple(u.shape)}")
    # ---- an audio patch (parallel/sp_audio.py) -------------------------------------------------
    def audio_load(self, tensors: dict, num_heads: int, eps: float = 1e-5, key: Optional[str] = None) -> str:
        """Hold an audio patch's per-block weights (InfiniteTalk / MultiTalk; names as in
        protocol.AudioLoad, any device) on every rank in the compute dtype; returns its key. The
        weights cross once: when the ranks hold this key already, nothing is sent. `key`:
        content_key of the same weights, when the caller has it (it costs a pass over them)."""
        with self._lock:
            wire = self.config.torch_dtype()
            key = key or content_key("audio", tensors, f"{wire}|{num_heads}|{eps}")
            if self.audio == key and self.alive:
                return key
            self.start()
            specs, _ = self.arena.pack(tensors, {}, {k: wire for k in tensors})
            self.audio = None
            self._call(P.AudioLoad(key, self.arena.name, specs, int(num_heads), float(eps)), self.config.load_timeout_s)
            self.audio = key
            self.audio_bytes = sum(t.numel() for t in tensors.values()) * wire.itemsize
            return key

    def _check_audio(self, info: P.Loaded, inputs: P.ForwardInputs):
        if inputs.audio_key is None:
            if inputs.audio_tokens is not None or inputs.audio_ref_masks is not None:
                raise ValueError("audio_tokens / audio_ref_masks given without an audio patch (audio_key)")
            return
        m = inputs.audio_ref_masks
        _, ph, pw = info.patch_size
        tokens = (inputs.hidden_states.shape[3] // ph) * (inputs.hidden_states.shape[4] // pw)  # a frame's tokens
        if m is not None and (m.ndim != 2 or m.shape[0] != 2 or m.shape[1] > tokens):
            raise ValueError(f"audio_ref_masks must be [2 speakers, <= {tokens} first-frame tokens], got {tuple(m.shape)}")
        if inputs.audio_key != self.audio:
            raise KeyError(f"audio patch {inputs.audio_key!r} is not loaded on this group (audio_load it first)")
        a, x = inputs.audio_tokens, inputs.hidden_states
        if a is None or a.ndim != 3 or a.shape[0] != x.shape[2]:
            raise ValueError(f"audio_tokens must be [{x.shape[2]} latent frames, tokens, dim], got "
                             f"{None if a is None else tuple(a.shape)}")
        if self.config.tensor_parallel_degree > 1 or self.config.pipeline_parallel_degree > 1:
            raise ConfigError("an audio patch (WanInfiniteTalkToVideo) runs with the sequence layouts (Ulysses, ring, "
                              "CFG split) and fsdp, not with tensor_parallel_degree or pipeline_parallel_degree > 1")

    # ---- the VAE (parallel/sp_vae.py) ------------------------------------------------------------
    def vae_load(self, state_dict: dict, dtype: str, key: Optional[str] = None) -> str:
        """Hold the Wan VAE `state_dict` (ComfyUI's key names, as `VAE.first_stage_model` holds
        them; any device) on every rank, computing in `dtype` ("bf16", "fp16", "fp32"); returns
        its key. The weights cross once: when the ranks hold this key already, nothing is sent.
        `key`: `vae_key` of the same weights, when the caller has it (it costs a pass over them).
        A state dict that is not a Wan VAE raises CheckpointError before anything starts."""
        from ..wan_to_xdit_mapping import vae_to_diffusers
        from .sp_vae import TORCH_DTYPES

        with self._lock:
            if dtype not in TORCH_DTYPES:
                raise ValueError(f"VAE dtype must be one of {tuple(TORCH_DTYPES)}, got {dtype!r}")
            tensors, info = vae_to_diffusers(state_dict)
            key = key or vae_key(tensors, dtype)
            if self.vae is not None and self.vae[0] == key and self.alive:
                return key
            self.start()
            wire = TORCH_DTYPES[dtype]
            specs, _ = self.arena.pack(tensors, {}, {k: wire for k in tensors})
            replies: list[P.VaeLoaded] = self._call(
                P.VaeLoad(key, self.arena.name, specs, info.diffusers_config, dtype), self.config.load_timeout_s)
            self.vae = (key, info, replies[0])
            self._note_memory([r.memory for r in replies])
            return key

    def vae_decode(self, key: str, latent: torch.Tensor, stats: Optional[dict] = None,
                   image: bool = False, schedule: str = "") -> torch.Tensor:
        """Decode `latent` [B, z, T, H, W] (ComfyUI's LATENT samples, unscaled) with the VAE `key`
        on every rank, split by latent rows (H >= world size; any H). Returns the video
        [B, C, 1 + 4(T-1), H*s, W*s] in [-1, 1], fp32 on the CPU: the single-process decode. With
        `image`: ComfyUI's IMAGE of it, [B * (1 + 4(T-1)), H*s, W*s, C] in [0, 1] ((x + 1) / 2
        clamped, as VAE.process_output and VAEDecode lay it out), made on the ranks. `schedule`:
        how the frames go through the decoder's finer scales (sp_vae.DECODE_SCHEDULES; "": the
        default); every schedule gives the same video."""
        from .sp_vae import decode_pieces

        decode_pieces(schedule, 0)  # a bad name fails here, before any rank runs
        return self._vae_run(key, latent, encode=False, stats=stats, image=image, schedule=schedule)

    def vae_encode(self, key: str, pixels: torch.Tensor, stats: Optional[dict] = None) -> torch.Tensor:
        """Encode `pixels` [B, C, F, H, W] in [-1, 1] (H, W multiples of the VAE's 8 or 16; H/s >=
        world size). Returns the posterior mean [B, z, 1 + (F-1)//4, H/s, W/s], fp32 on the CPU, as
        ComfyUI's Wan VAE encode does (extra frames past 1 + 4k are dropped, as there)."""
        return self._vae_run(key, pixels, encode=True, stats=stats)

    def _vae_run(self, key: str, x: torch.Tensor, encode: bool, stats: Optional[dict], image: bool = False,
                 schedule: str = "") -> torch.Tensor:
        with self._lock:
            if self.vae is None or self.vae[0] != key:
                raise KeyError(f"VAE {key!r} is not loaded on this group (vae_load it first)")
            info = self.vae[1]
            out_shape = vae_output_shape(info, tuple(x.shape), encode, self.config.world_size)
            if image:
                b, c, f, h, w = out_shape
                out_shape = (b * f, h, w, c)
            t0 = time.perf_counter()
            specs, reserved = self.arena.pack({"input": x}, {"out": (out_shape, torch.float32)},
                                              {"input": torch.float32})
            if encode:
                request = P.VaeEncode(key, self.arena.name, specs["input"], reserved["out"])
            else:
                request = P.VaeDecode(key, self.arena.name, specs["input"], reserved["out"], image=image,
                                      schedule=schedule)
            replies: list[P.VaeDone] = self._call(request, self.config.forward_timeout_s)
            out = self.arena.read(reserved["out"])
            self.memory_stats = None  # the ranks trim after replying: memory() asks them again
            if stats is not None:
                stats.update(owner_ms=(time.perf_counter() - t0) * 1e3, worker_ms=max(r.ms for r in replies),
                             rows=[r.rows for r in replies], peak_bytes=[r.peak_bytes for r in replies],
                             schedule=[r.schedule for r in replies],
                             peak_rss=[r.peak_rss for r in replies])
            return out

    def _check_memory(self, key: str, inputs: P.ForwardInputs):
        """Before the first forward at a video size: refuse one the memory plan says will not fit
        (as a clear error, not an out-of-memory failure that takes the group down)."""
        from .memory import card_bytes, estimate

        shape = tuple(inputs.hidden_states.shape)
        uni3c = inputs.uni3c is not None and self.uni3c is not None
        audio = inputs.audio_key is not None and inputs.audio_key == self.audio
        if (key, shape, uni3c, audio) in self._sizes_checked or self.config.device != "cuda":
            return
        loaded = self.models[key]
        resident = sum(m.param_bytes for k, m in self.models.items() if k != key)
        # Uni3C's control net and an audio patch's weights are whole on every rank (their activations are
        # small beside the model's and not counted)
        resident += (self.uni3c[2] if uni3c else 0) + (self.audio_bytes if audio else 0)
        plan = estimate(self._infos[key], self.config, loaded.placement, shape[2:], shape[0],
                        card_bytes(self.config), resident)
        if not plan.fits:
            raise ConfigError(
                f"a {shape[0]} x {'x'.join(map(str, shape[2:]))} latent does not fit: {plan.describe()}. Use a "
                "smaller video or batch, more GPUs, weight_sharding='fsdp' or weight_dtype='fp8_e4m3fn'.")
        self._sizes_checked.add((key, shape, uni3c, audio))

    def ping(self) -> list[P.Pong]:
        """Every rank's answer (rank, models it holds): a round trip through each request loop."""
        with self._lock:
            return self._call(P.Ping(), 30)

    @staticmethod
    def _check_inputs(info: P.Loaded, inputs: P.ForwardInputs):
        """Shape errors are caught here, before any rank can diverge inside a collective."""
        x, t, ctx = inputs.hidden_states, inputs.timestep, inputs.encoder_hidden_states
        if x.ndim != 5:
            raise ValueError(f"hidden_states must be [B, C, frames, height, width], got {tuple(x.shape)}")
        if x.shape[1] != info.in_channels:
            raise ValueError(f"hidden_states has {x.shape[1]} channels but the {info.variant} model takes {info.in_channels}")
        pt, ph, pw = info.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent {tuple(x.shape[2:])} is not divisible by the patch size {tuple(info.patch_size)}")
        if ctx.ndim != 3 or ctx.shape[0] != x.shape[0]:
            raise ValueError(f"encoder_hidden_states must be [B, tokens, dim] with B={x.shape[0]}, got {tuple(ctx.shape)}")
        if t.ndim > 2:
            raise ValueError(f"timestep must be [B], [B, frames] or [B, tokens], got {tuple(t.shape)}")


def uni3c_key(tensors: dict) -> str:
    """The content key of a Uni3C control net's weights."""
    return content_key("uni3c", tensors, "")


def vae_key(tensors: dict, dtype: str) -> str:
    """The content key of a VAE's weights (any names, any device) in compute dtype `dtype`: a
    BLAKE2 hash of every tensor's name, dtype, shape and bytes, in name order."""
    return content_key("vae", tensors, dtype)


def content_key(prefix: str, tensors: dict, tag: str) -> str:
    """`prefix`-<BLAKE2 hash of `tag` and every tensor's name, dtype, shape and bytes, in name order>."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    h.update(tag.encode())
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())  # the buffer, not a copy of it
    return prefix + "-" + h.hexdigest()


def vae_output_shape(info, shape: tuple, encode: bool, world: int) -> tuple:
    """The output shape of a decode (`shape`: the latent's) or an encode (`shape`: the video's)
    with the VAE `info` (wan_to_xdit_mapping.VaeInfo); ValueError for an input it cannot take."""
    s, z, cfg = info.spatial, info.z_dim, info.diffusers_config
    patch = cfg.get("patch_size") or 1
    channels = cfg["in_channels" if encode else "out_channels"] // (patch * patch)  # pixels (2.2 patchifies 2x2)
    what = "video [B, C, frames, height, width]" if encode else "latent [B, z, frames, height, width]"
    if len(shape) != 5:
        raise ValueError(f"the VAE takes a {what}, got shape {shape}")
    b, c, t, h, w = shape
    if encode:
        if c != channels:
            raise ValueError(f"the Wan {info.version} VAE encodes {channels}-channel video, got {c} channels")
        if h % s or w % s:
            raise ValueError(f"video height and width must be multiples of {s} for the Wan {info.version} VAE, "
                             f"got {h}x{w}")
        h, w = h // s, w // s
    elif c != z:
        raise ValueError(f"the Wan {info.version} VAE decodes {z}-channel latents, got {c} channels")
    if h < world:
        raise ValueError(f"a latent {h} rows high cannot be split over {world} ranks (one row each at least): "
                         "use fewer GPUs for this VAE")
    if b < 1 or t < 1 or w < 1:
        raise ValueError(f"empty {what}: {shape}")
    if encode:
        return (b, z, 1 + (t - 1) // 4, h, w)
    return (b, channels, 1 + 4 * (t - 1), h * s, w * s)


# ---- the registry the ComfyUI nodes use: one warm group per set of devices --------------------
# Every config has at most one registered group, and load_model() keeps at most one of the groups
# whose ranks share a device (a GPU, or the CPU) running: each would hold a CUDA context and its own
# copy of the weights on every card.
_groups: dict[str, WorkerGroup] = {}
_groups_lock = threading.RLock()


def shares_devices(a: XDitUSPConfig, b: XDitUSPConfig) -> bool:
    """Whether ranks of `a` and `b` would run on a common device (every CPU group shares the CPU)."""
    if a.device != b.device:
        return False
    return a.device == "cpu" or not set(a.visible_device_ids()).isdisjoint(b.visible_device_ids())


def get_group(config: XDitUSPConfig) -> WorkerGroup:
    """The registered group of `config`; registered (not started) if there is none."""
    key = config.to_json()
    with _groups_lock:
        g = _groups.get(key)
        if g is None:
            g = _groups[key] = WorkerGroup(config)
        return g


def find_group(config: XDitUSPConfig) -> Optional[WorkerGroup]:
    """The registered group of `config`, or None."""
    with _groups_lock:
        return _groups.get(config.to_json())


def registered_groups() -> list[WorkerGroup]:
    """Every registered group, running or not."""
    with _groups_lock:
        return list(_groups.values())


def close_group(group: WorkerGroup):
    """Close `group` and drop it from the registry."""
    with _groups_lock:
        key = group.config.to_json()
        if _groups.get(key) is group:
            del _groups[key]
        group.close()


def load_model(config: XDitUSPConfig, key: str, path: str, on_evict=None) -> dict:
    """`load(key, path)` on the registered group of `config`, keeping one group per set of devices.

    First every other registered group whose ranks share a device with it is closed and dropped
    (`on_evict(group)` is called first for each one running): its models are unloaded, and loading
    one again through this function starts its group again. A load that fails leaves no idle group
    behind: its group is closed and dropped unless other models are loaded on it. Starts and loads
    are serialized, so the one-group-per-device-set rule holds across threads."""
    with _groups_lock:
        group = get_group(config)
        for other in [g for g in _groups.values() if g is not group and shares_devices(g.config, config)]:
            if on_evict is not None and other.alive:
                on_evict(other)
            close_group(other)
        try:
            return group.load(key, path)
        except BaseException:
            if not group.models:
                close_group(group)
            raise


def vae_group(config: XDitUSPConfig, on_evict=None) -> WorkerGroup:
    """The group a VAE run of `config` uses: a running registered group on the same devices with
    the same number of ranks (the VAE needs nothing else of a config: the loader's group with its
    own weight_dtype serves, and is not replaced), else the registered group of `config`, after the
    other groups on these devices are closed as `load_model` does (`on_evict(group)` called first
    for each running one). It is started by its first request."""
    with _groups_lock:
        same = lambda g: (g.config.device == config.device and g.config.world_size == config.world_size  # noqa: E731
                          and (config.device == "cpu" or g.config.visible_device_ids() == config.visible_device_ids()))
        running = [g for g in _groups.values() if g.alive and same(g)]
        exact = _groups.get(config.to_json())
        if exact is not None and exact in running:
            return exact
        if running:
            return running[0]
        group = get_group(config)
        for other in [g for g in _groups.values() if g is not group and shares_devices(g.config, config)]:
            if on_evict is not None and other.alive:
                on_evict(other)
            close_group(other)
        return group


def close_idle_groups() -> list[WorkerGroup]:
    """Close and drop every registered group with no model loaded (a stopped group has none);
    returns them. ComfyUI's unload/free paths call it once they have unloaded models."""
    with _groups_lock:
        idle = [g for g in _groups.values() if not (g.alive and g.models)]
        for g in idle:
            close_group(g)
        return idle


def close_all_groups():
    with _groups_lock:
        for g in list(_groups.values()):
            close_group(g)
