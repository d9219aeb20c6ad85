"""Owner <-> worker transport: an authenticated loopback control channel, tensors in shared memory.

Control messages are small pickled tuples over `multiprocessing.connection` (HMAC challenge with a
random per-group key, bound to 127.0.0.1 only). Tensors never go through the socket: the owner
writes them into one reusable POSIX shared-memory arena and sends (offset, shape, dtype); every
rank maps the arena and reads its inputs directly, and each group leader writes its slice of the
output into the region the owner reserved.
"""
from __future__ import annotations

import os
import secrets
import select
import socket
import struct
import time
from multiprocessing import connection as mpc
from multiprocessing import shared_memory
from typing import Optional

import torch

_ALIGN = 64
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32)}


def new_authkey() -> bytes:
    return secrets.token_bytes(32)


class ControlListener:
    """Listening socket on 127.0.0.1 at a free port; `accept` has a timeout and authenticates."""

    def __init__(self, authkey: bytes):
        self.authkey = authkey
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address = self.sock.getsockname()

    def accept(self, timeout: float) -> Optional[mpc.Connection]:
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not ready:
            return None
        s, _ = self.sock.accept()
        s.setblocking(True)
        _recv_timeout(s, 30.0)  # the challenge must complete promptly
        fd = s.detach()
        conn = mpc.Connection(fd)
        try:
            mpc.deliver_challenge(conn, self.authkey)
            mpc.answer_challenge(conn, self.authkey)
        except Exception:
            conn.close()
            raise
        with socket.socket(fileno=os.dup(fd)) as s2:
            _recv_timeout(s2, 0.0)  # back to fully blocking; waits use conn.poll(timeout)
        return conn

    def close(self):
        self.sock.close()


def _recv_timeout(s: socket.socket, seconds: float):
    sec = int(seconds)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, int((seconds - sec) * 1e6)))


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

    def __init__(self, prefix: str = "xdit_usp"):
        self.prefix = prefix
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
            name=f"{self.prefix}_{os.getpid()}_{secrets.token_hex(4)}", create=True, size=size
        )

    def pack(self, tensors: dict, reserve: dict, dtypes: Optional[dict] = None) -> tuple[dict, dict]:
        """Write `tensors` ({name: Tensor|None}, each cast to dtypes[name] if given) and reserve
        space for `reserve` ({name: (shape, dtype)}).

        Returns (specs of written tensors, specs of reserved regions)."""
        dtypes = dtypes or {}
        layout, offset = {}, 0
        items = [(k, tuple(t.shape), dtypes.get(k, t.dtype)) for k, t in tensors.items() if t is not None]
        items += [(k, tuple(shape), dtype) for k, (shape, dtype) in reserve.items()]
        for name, shape, dtype in items:
            nbytes = _nbytes(shape, dtype)
            layout[name] = (offset, shape, str(dtype))  # plain builtins: the protocol pickles no classes
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self._ensure(offset)
        for name, t in tensors.items():
            if t is not None:
                view(self.shm.buf, layout[name]).copy_(t.detach().reshape(t.shape))
        written = {k: v for k, v in layout.items() if k in tensors}
        return written, {k: v for k, v in layout.items() if k in reserve}

    def read(self, spec, dtype=None) -> torch.Tensor:
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
            try:
                shm.unlink()
            except FileNotFoundError:
                pass


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def view(buf, spec) -> torch.Tensor:
    """A tensor viewing `spec` inside a shared-memory buffer (no copy)."""
    offset, shape, dtype = spec
    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    n = _nbytes(shape, dtype)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=n // torch.empty((), dtype=dtype).element_size(), offset=offset).view(shape)


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
    """The owner owns the block; stop this process's resource tracker from unlinking it at exit."""
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001 (Python < 3.13 has no track=False)
    except Exception:
        pass
