"""Owner <-> worker transport: an authenticated loopback control channel, tensors in shared memory.

Control messages are small pickled tuples over `multiprocessing.connection` (HMAC challenge with a
random per-group key, bound to 127.0.0.1 only). Tensors never go through the socket: the owner
writes them into one reusable POSIX shared-memory arena and sends (offset, shape, dtype); every
rank maps the arena and reads its inputs directly, and each group leader writes its slice of the
output into the region the owner reserved.
"""
from __future__ import annotations

import os
import queue
import secrets
import select
import socket
import struct
import threading
import time
from multiprocessing import connection as mpc
from multiprocessing import shared_memory
from typing import Optional

import torch

from . import reaper
from .protocol import TensorSpec

_ALIGN = 64
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32)}


def new_authkey() -> bytes:
    return secrets.token_bytes(32)


class ControlListener:
    """Listening socket on 127.0.0.1 at a free port. Every connection is authenticated (HMAC challenge)
    in a thread of its own with a deadline of `handshake_s`, so a client that connects and sends
    nothing is dropped after that and never delays the others; `accept` returns authenticated
    connections only."""

    def __init__(self, authkey: bytes, handshake_s: float = 2.0):
        self.authkey = authkey
        self.handshake_s = handshake_s
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address = self.sock.getsockname()
        self._ready: "queue.Queue[mpc.Connection]" = queue.Queue()
        self._closed = threading.Event()
        self.rejected = 0  # connections dropped: wrong key, or no handshake within handshake_s
        self._rejected_lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept_loop, name="xdit-usp-accept", daemon=True)
        self._acceptor.start()

    def _accept_loop(self):
        while not self._closed.is_set():
            try:
                ready, _, _ = select.select([self.sock], [], [], 0.1)
                if ready:
                    s, _ = self.sock.accept()
                    threading.Thread(target=self._authenticate, args=(s,), daemon=True).start()
            except OSError:  # closed under us
                return

    def _authenticate(self, s: socket.socket):
        s.setblocking(True)
        _set_timeouts(s, self.handshake_s)  # the whole challenge must complete promptly
        conn = mpc.Connection(s.detach())
        try:
            mpc.deliver_challenge(conn, self.authkey)
            mpc.answer_challenge(conn, self.authkey)
        except Exception:  # wrong key, silence past the deadline, or a reset
            conn.close()
            with self._rejected_lock:
                self.rejected += 1
            return
        with socket.socket(fileno=os.dup(conn.fileno())) as s2:
            _set_timeouts(s2, 0.0)  # back to fully blocking; waits use conn.poll(timeout)
        if self._closed.is_set():
            conn.close()
        else:
            self._ready.put(conn)

    def accept(self, timeout: float) -> Optional[mpc.Connection]:
        """The next authenticated connection, or None after `timeout` seconds."""
        try:
            return self._ready.get(timeout=max(timeout, 0))
        except queue.Empty:
            return None

    def close(self):
        self._closed.set()
        self.sock.close()
        self._acceptor.join(1.0)
        while not self._ready.empty():  # authenticated but never taken
            self._ready.get_nowait().close()


def _set_timeouts(s: socket.socket, seconds: float):
    """Kernel-level receive and send timeouts (0 = none) on a blocking socket."""
    sec = int(seconds)
    tv = struct.pack("ll", sec, int((seconds - sec) * 1e6))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def connect(address, authkey: bytes, timeout: float = 60.0) -> mpc.Connection:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return mpc.Client(tuple(address), authkey=authkey)
        except (ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def recv(conn: mpc.Connection, timeout: float):
    """Receive one message or raise TimeoutError; EOFError when the peer is gone."""
    if not conn.poll(timeout):
        raise TimeoutError
    return conn.recv()


class ShmArena:
    """Owner side: one growable shared-memory block for a worker group."""

    def __init__(self):
        self.shm: Optional[shared_memory.SharedMemory] = None

    @property
    def name(self) -> str:
        return self.shm.name

    def _ensure(self, nbytes: int):
        if self.shm is not None and self.shm.size >= nbytes:
            return
        self.close()
        size = max(nbytes, 1 << 20)
        size = 1 << (size - 1).bit_length()  # powers of two: few re-creations
        self.shm = shared_memory.SharedMemory(
            name=f"{reaper.SHM_PREFIX}_{os.getpid()}_{secrets.token_hex(4)}", create=True, size=size
        )
        # We unlink it in close(); if this process is killed first, the reaper does (by its name).
        # Python's resource tracker would do it too, with a "leaked shared_memory" warning.
        _untrack(self.shm)

    def pack(self, tensors: dict, reserve: dict, dtypes: Optional[dict] = None) -> tuple[dict, dict]:
        """Write `tensors` ({name: Tensor|None}, each cast to dtypes[name] if given) and reserve
        space for `reserve` ({name: (shape, dtype)}).

        Returns ({name: TensorSpec} of the written tensors, {name: TensorSpec} of the reserved regions)."""
        dtypes = dtypes or {}
        specs, offset = {}, 0
        items = [(k, tuple(t.shape), dtypes.get(k, t.dtype)) for k, t in tensors.items() if t is not None]
        items += [(k, tuple(shape), dtype) for k, (shape, dtype) in reserve.items()]
        for name, shape, dtype in items:
            specs[name] = TensorSpec(offset, shape, str(dtype))
            offset += -(-_nbytes(shape, dtype) // _ALIGN) * _ALIGN
        self._ensure(offset)
        for name, t in tensors.items():
            if t is not None:
                view(self.shm.buf, specs[name]).copy_(t.detach().reshape(t.shape))
        return ({k: v for k, v in specs.items() if k in tensors}, {k: v for k, v in specs.items() if k in reserve})

    def read(self, spec: TensorSpec, dtype=None) -> torch.Tensor:
        """A copy of the region `spec` (in `dtype` if given), independent of the arena."""
        v = view(self.shm.buf, spec)
        return v.to(dtype, copy=True) if dtype is not None else v.clone()

    def close(self):
        if self.shm is not None:
            shm, self.shm = self.shm, None
            try:
                shm.close()
            except BufferError:
                pass  # a live tensor view still points into it; unlink anyway
            try:  # not shm.unlink(): the block is not in the resource tracker's books (see _ensure)
                os.unlink(os.path.join("/dev/shm", shm.name.lstrip("/")))
            except FileNotFoundError:
                pass


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def view(buf, spec: TensorSpec) -> torch.Tensor:
    """A tensor viewing `spec` inside a shared-memory buffer (no copy)."""
    dtype = _DTYPES[spec.dtype]
    n = _nbytes(spec.shape, dtype)
    if n == 0:
        return torch.empty(spec.shape, dtype=dtype)
    count = n // torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=spec.offset).view(spec.shape)


class ShmReader:
    """Worker side: maps the owner's arena by name (re-maps when the owner grows it).

    On CUDA the mapping is page-locked once (cudaHostRegister), so copies between it and the GPU
    run at full PCIe/NVLink-C2C speed instead of through a pageable staging buffer."""

    def __init__(self):
        self.shm: Optional[shared_memory.SharedMemory] = None
        self.pinned = False
        self._base: Optional[torch.Tensor] = None

    def buf(self, name: str, pin: bool = False):
        if self.shm is None or self.shm.name.lstrip("/") != name.lstrip("/"):
            self.close()
            self.shm = shared_memory.SharedMemory(name=name, create=False)
            _untrack(self.shm)
        if pin and not self.pinned:
            self._base = torch.frombuffer(self.shm.buf, dtype=torch.uint8)
            err = torch.cuda.cudart().cudaHostRegister(self._base.data_ptr(), self._base.numel(), 0)
            self.pinned = int(err) == 0  # not fatal: pageable copies still work, only slower
        return self.shm.buf

    def close(self):
        if self.pinned:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaHostUnregister(self._base.data_ptr())
            self.pinned = False
        self._base = None
        if self.shm is not None:
            try:
                self.shm.close()
            except BufferError:
                pass
            self.shm = None


def _untrack(shm: shared_memory.SharedMemory):
    """Keep the block out of this process's resource tracker: the owner unlinks it (or the reaper
    does), and the tracker would otherwise unlink it early or warn of a leak at exit."""
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001 (Python < 3.13 has no track=False)
    except Exception:
        pass
