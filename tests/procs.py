"""The real process table, sockets and /dev/shm, read the way the failure tests need them."""
from __future__ import annotations

import glob
import os
import time


def processes_with_env(marker: str) -> list[int]:
    """Live (non-zombie) processes whose environment contains `marker` (e.g. "XDIT_USP_LOG_DIR=...")."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in env and state != "Z":
            found.append(int(pid))
    return found


def group_processes(log_dir: str) -> list[int]:
    """Every live process of the worker group whose log folder is `log_dir` (torchrun's agent and
    the ranks carry it in their environment)."""
    return processes_with_env(f"XDIT_USP_LOG_DIR={log_dir}")


def worker_processes(owner_pid: int | None = None) -> list[int]:
    """Live worker-group processes (torchrun agents and ranks) started by `owner_pid` (default: this
    process): the launcher puts XDIT_USP_OWNER_PID in their environment, so ranks whose agent died
    and that were re-parented are found too."""
    return sorted(processes_with_env(f"XDIT_USP_OWNER_PID={os.getpid() if owner_pid is None else owner_pid}"))


def wait_until(predicate, timeout: float, interval: float = 0.1):
    """Poll `predicate` until it returns a falsy value or `timeout` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if not value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def wait_gone(log_dir: str, timeout: float = 15.0) -> list[int]:
    return wait_until(lambda: group_processes(log_dir), timeout)


def wait_worker_processes(count: int, owner_pid: int | None = None, timeout: float = 20.0) -> list[int]:
    """worker_processes(), once there are `count` of them (a closed group's ranks take a moment to be
    reaped), or whatever is there after `timeout` seconds."""
    found: list[int] = []

    def other_count():
        found[:] = worker_processes(owner_pid)
        return len(found) != count

    wait_until(other_count, timeout)
    return found


def shm_segments(owner_pid: int) -> list[str]:
    return [os.path.basename(p) for p in glob.glob(f"/dev/shm/xdit_usp_{owner_pid}_*")]


def listening_addresses(pids) -> list[str]:
    """Local addresses ("127.0.0.1:41234", "0.0.0.0:29500", "[::]:29500") of every TCP socket in
    LISTEN state that one of `pids` holds open."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state != "0A" or inode not in inodes:  # 0A = TCP_LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            raw = bytes.fromhex(addr_hex)
            if v6:  # four little-endian 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                import ipaddress

                addr = f"[{ipaddress.IPv6Address(raw)}]"
            else:
                addr = ".".join(str(b) for b in raw[::-1])
            out.append(f"{addr}:{int(port_hex, 16)}")
    return out
