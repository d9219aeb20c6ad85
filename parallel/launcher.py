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
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from multiprocessing import connection as mpc
from typing import Optional

import torch

from . import transport
from .config import XDitUSPConfig

ENTRY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_entry.py")
# NVLink SHARP / multicast stay off wherever we set NCCL's environment (see DESIGN notes).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class WorkerError(RuntimeError):
    """A worker failed; `.rank` names it and the message carries its traceback or log tail."""

    def __init__(self, message: str, rank: Optional[int] = None):
        super().__init__(message)
        self.rank = rank


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().decode(errors="replace").splitlines()[-n:]
        return "\n".join("    " + ln for ln in lines)
    except OSError:
        return "    (no log)"


_live_groups: "weakref.WeakSet[WorkerGroup]" = weakref.WeakSet()


@atexit.register
def _close_all():
    for g in list(_live_groups):
        g.close()


class WorkerGroup:
    def __init__(self, config: XDitUSPConfig, env: Optional[dict] = None):
        self.config = config.validate()
        self.env = dict(env or {})
        self.proc: Optional[subprocess.Popen] = None
        self.conns: list[mpc.Connection] = []
        self.pids: list[int] = []
        self.models: dict[str, dict] = {}
        self.log_dir: Optional[str] = None
        self.arena = transport.ShmArena()
        self.launches = 0
        self._lock = threading.RLock()

    # ---- lifecycle --------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and len(self.conns) == self.config.world_size

    def start(self):
        with self._lock:
            if self.alive:
                return
            self.close()
            cfg = self.config
            cfg.validate()  # device count, now that we are about to use the devices
            self.log_dir = tempfile.mkdtemp(prefix="xdit_usp_logs_")
            authkey = transport.new_authkey()
            listener = transport.ControlListener(authkey)
            env = dict(os.environ)
            env.update(NCCL_ENV)
            env.update(cfg.extra_env)
            env.update(self.env)
            env.update(
                XDIT_USP_ADDR=json.dumps(list(listener.address)),
                XDIT_USP_AUTHKEY=authkey.hex(),
                XDIT_USP_OWNER_PID=str(os.getpid()),
                XDIT_USP_CONFIG=cfg.to_json(),
                XDIT_USP_LOG_DIR=self.log_dir,
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
                sys.executable, "-m", "torch.distributed.run",
                "--nnodes=1", f"--nproc-per-node={cfg.world_size}",
                "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
                "--max-restarts=0", "--monitor-interval=0.5",
                ENTRY,
            ]
            agent_log = open(os.path.join(self.log_dir, "torchrun.log"), "wb")
            self.proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=agent_log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: we can kill the whole tree
            )
            agent_log.close()
            self.launches += 1
            _live_groups.add(self)
            try:
                self._handshake(listener, cfg.launch_timeout_s)
            except BaseException:
                self.close(keep_logs=True)
                raise
            finally:
                listener.close()

    def _handshake(self, listener: transport.ControlListener, timeout: float):
        n = self.config.world_size
        conns: dict[int, mpc.Connection] = {}
        pids: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        while len(conns) < n:
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
            try:
                conn = listener.accept(0.2)
            except (OSError, EOFError, mpc.AuthenticationError):
                continue  # a stray or unauthenticated client; keep waiting for ours
            if conn is None:
                continue
            op, hello = transport.recv(conn, 30)
            conns[hello["rank"]] = conn
            pids[hello["rank"]] = hello["pid"]
        self.conns = [conns[r] for r in range(n)]
        self.pids = [pids[r] for r in range(n)]

    def close(self, keep_logs: bool = False):
        """Stop every worker (politely, then by signal) and free the shared memory. The log
        folder is removed unless `keep_logs` (failures keep it: their error message names it)."""
        with self._lock:
            for c in self.conns:
                try:
                    c.send(("shutdown", {}))
                except Exception:
                    pass
            proc, self.proc = self.proc, None
            if proc is not None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
                for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                    if proc.poll() is not None:
                        break
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        proc.wait(timeout=wait)
                    except subprocess.TimeoutExpired:
                        pass
            # workers that outlived torchrun's agent (they also watch us; this is belt and braces)
            for pid in self.pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            for c in self.conns:
                c.close()
            self.conns, self.pids, self.models = [], [], {}
            self.arena.close()
            if self.log_dir and not keep_logs and proc is not None:
                shutil.rmtree(self.log_dir, ignore_errors=True)
            _live_groups.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

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

    def _call(self, op: str, payload: dict, timeout: float) -> list:
        """Send one request to every rank and collect every reply, or fail within `timeout`."""
        if not self.alive:
            raise WorkerError("the worker group is not running (it was closed or a worker died); it restarts on the next load")
        for c in self.conns:
            c.send((op, payload))
        replies: dict[int, object] = {}
        errors: dict[int, dict] = {}
        pending = {c: r for r, c in enumerate(self.conns)}
        deadline = time.monotonic() + timeout
        grace = None
        while pending:
            if errors and grace is None:  # give the others a moment to report too, then stop waiting
                grace = time.monotonic() + 2.0
                deadline = min(deadline, grace)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for c in mpc.wait(list(pending), timeout=min(left, 0.5)):
                r = pending.pop(c)
                try:
                    status, value = c.recv()
                except (EOFError, OSError):
                    errors[r] = {"type": "WorkerDied", "message": f"rank {r} exited", "traceback": ""}
                    continue
                if status == "ok":
                    replies[r] = value
                else:
                    errors[r] = value
            if self.proc.poll() is not None and pending:
                for r in pending.values():
                    errors.setdefault(r, {"type": "WorkerDied", "message": f"rank {r} exited", "traceback": ""})
                pending.clear()
        if errors or pending:
            broken = bool(pending) or any(e["type"] == "WorkerDied" for e in errors.values())
            # Blame the root cause: a rank that raised, else the rank that died first (torchrun
            # then terminates the others, whose deaths arrive later), else the first stuck rank.
            raised = [r for r, e in errors.items() if e["type"] != "WorkerDied"]
            first = raised[0] if raised else next(iter(errors)) if errors else min(pending.values())
            if errors:
                e = errors[first]
                msg = f"rank {first} failed in {op!r}: {e['type']}: {e['message']}"
                if e.get("traceback"):
                    msg += "\n" + e["traceback"]
            else:
                msg = f"{op!r} timed out after {timeout:.0f}s waiting for rank(s) {sorted(pending.values())}"
            if broken:
                self.close(keep_logs=True)  # a dead or stuck rank: the group can't be trusted; next load relaunches
                msg += "\n" + self._logs([first]) + "\nThe worker group was shut down; it restarts on the next run."
            raise WorkerError(msg, rank=first)
        return [replies[r] for r in range(self.config.world_size)]

    def load(self, key: str, path: str) -> dict:
        """Load a checkpoint on every rank under `key` (starting the group if needed)."""
        with self._lock:
            from ..wan_to_xdit_mapping import inspect_checkpoint

            if not os.path.exists(path):
                raise FileNotFoundError(f"checkpoint not found: {path}")
            info = inspect_checkpoint(path)  # a bad file fails here, before any worker is involved
            self.config.resolve(info.num_heads)  # and so does a layout the model's heads can't take
            self.start()
            info = self._call("load", {"key": key, "path": os.path.abspath(path)}, self.config.load_timeout_s)[0]
            info["path"] = os.path.abspath(path)
            self.models[key] = info
            return info

    def unload(self, key: str):
        with self._lock:
            if key in self.models and self.alive:
                self._call("unload", {"key": key}, 60)
            self.models.pop(key, None)

    def set_lora(self, key: str, patches: dict[str, list]) -> dict:
        """Replace the LoRA state of model `key`; merged on the workers, base weights kept there.

        patches: {diffusers weight name: [("lora", up, down, scale) | ("diff", delta, scale), ...]}
        ({} removes every LoRA). Only the low-rank factors cross the process boundary."""
        with self._lock:
            if key not in self.models:
                raise KeyError(f"no model loaded under {key!r}")
            tensors, specs = {}, {}
            for name, items in patches.items():
                out = []
                for j, item in enumerate(items):
                    kind, *arrays, scale = item
                    if kind not in ("lora", "diff") or len(arrays) != (2 if kind == "lora" else 1):
                        raise ValueError(f"{name}: a LoRA patch is ('lora', up, down, scale) or ('diff', delta, scale)")
                    names = [f"{name}#{j}#{i}" for i in range(len(arrays))]
                    tensors.update({n: a.float().contiguous() for n, a in zip(names, arrays)})
                    out.append((kind, *names, float(scale)))
                specs[name] = out
            written, _ = self.arena.pack(tensors, {})
            patches_msg = {name: [(kind, *[written[n] for n in refs], scale) for kind, *refs, scale in items]
                           for name, items in specs.items()}
            arena = self.arena.name if tensors else ""
            return self._call("lora", {"key": key, "arena": arena, "patches": patches_msg}, self.config.load_timeout_s)[0]

    def forward(
        self,
        key: str,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: Optional[torch.Tensor] = None,
        control_hidden_states: Optional[torch.Tensor] = None,
        control_hidden_states_scale=None,
        stats: Optional[dict] = None,
    ) -> torch.Tensor:
        """One transformer forward of model `key` on the group; diffusers' argument names.

        timestep: [B], or per latent frame [B, frames], or per token [B, tokens] (Wan 2.2 TI2V).
        Returns [B, out_channels, frames, height, width] in hidden_states' dtype, on the CPU."""
        with self._lock:
            info = self.models.get(key)
            if info is None:
                raise KeyError(f"no model loaded under {key!r} (loaded: {sorted(self.models)})")
            self._check_inputs(info, hidden_states, timestep, encoder_hidden_states)
            b, _, f, h, w = hidden_states.shape
            timestep = timestep.reshape(-1) if timestep.ndim == 0 else timestep
            if timestep.shape[0] == 1 and b > 1:
                timestep = timestep.expand(b, *timestep.shape[1:])
            wire = self.config.torch_dtype()  # the workers compute in it: send and receive in it
            tensors = {
                "hidden_states": hidden_states,
                "timestep": timestep.float(),
                "encoder_hidden_states": encoder_hidden_states,
                "encoder_hidden_states_image": encoder_hidden_states_image,
                "control_hidden_states": control_hidden_states,
            }
            dtypes = {k: (torch.float32 if k == "timestep" else wire) for k in tensors}
            out_shape = (b, info["out_channels"], f, h, w)
            t0 = time.perf_counter()
            inputs, reserved = self.arena.pack(tensors, {"out": (out_shape, wire)}, dtypes)
            t1 = time.perf_counter()
            scale = None
            if control_hidden_states_scale is not None:
                scale = torch.as_tensor(control_hidden_states_scale, dtype=torch.float32).flatten().tolist()
            replies = self._call(
                "forward",
                {"key": key, "arena": self.arena.name, "inputs": inputs, "out": reserved["out"], "control_scale": scale},
                self.config.forward_timeout_s,
            )
            t2 = time.perf_counter()
            out = self.arena.read(reserved["out"], hidden_states.dtype)
            if stats is not None:
                t3 = time.perf_counter()
                stats.update(
                    owner_ms=(t3 - t0) * 1e3, pack_ms=(t1 - t0) * 1e3, read_ms=(t3 - t2) * 1e3,
                    worker_ms=max(r["ms"] for r in replies), worker_in_ms=max(r["in_ms"] for r in replies),
                    worker_out_ms=max(r["out_ms"] for r in replies), layout=replies[0]["layout"],
                    pinned=replies[0]["pinned"], peak_bytes=[r["peak_bytes"] for r in replies],
                )
            return out

    @staticmethod
    def _check_inputs(info, x, t, ctx):
        """Shape errors are caught here, before any rank can diverge inside a collective."""
        if x.ndim != 5:
            raise ValueError(f"hidden_states must be [B, C, frames, height, width], got {tuple(x.shape)}")
        if x.shape[1] != info["in_channels"]:
            raise ValueError(
                f"hidden_states has {x.shape[1]} channels but the {info['variant']} model takes {info['in_channels']}"
            )
        pt, ph, pw = info["patch_size"]
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent {tuple(x.shape[2:])} is not divisible by the patch size {tuple(info['patch_size'])}")
        if ctx.ndim != 3 or ctx.shape[0] != x.shape[0]:
            raise ValueError(f"encoder_hidden_states must be [B, tokens, dim] with B={x.shape[0]}, got {tuple(ctx.shape)}")
        if t.ndim > 2:
            raise ValueError(f"timestep must be [B], [B, frames] or [B, tokens], got {tuple(t.shape)}")


# ---- the registry the ComfyUI nodes use: one warm group per set of devices --------------------
# Every config has at most one registered group, and load_model() keeps at most one of the groups
# whose ranks share a device (a GPU, or the CPU) running: each would hold a CUDA context and its own
# copy of the weights on every card.
_groups: dict[str, WorkerGroup] = {}
_groups_lock = threading.RLock()


def _share_devices(a: XDitUSPConfig, b: XDitUSPConfig) -> bool:
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
        for other in [g for g in _groups.values() if g is not group and _share_devices(g.config, config)]:
            if on_evict is not None and other.alive:
                on_evict(other)
            close_group(other)
        try:
            return group.load(key, path)
        except BaseException:
            if not group.models:
                close_group(group)
            raise


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
