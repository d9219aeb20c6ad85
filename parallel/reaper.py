"""Clean up after the owner process however it ends, SIGKILL included.

The owner (ComfyUI, the CLI, a script) starts one small watcher process the first time it launches a
worker group, and tells it over a pipe what to remove should the owner die: torchrun's process
group, worker pids, folders (run folders, the CLI's tiny checkpoint). The watcher blocks on that
pipe; the kernel closes it when the owner exits for any reason, and the watcher then kills what is
still registered, removes the folders and unlinks the owner's shared-memory segments
(`/dev/shm/xdit_usp_<owner pid>_*`). A clean close unregisters everything first, so normally the
watcher has nothing to do.

    reaper.track("pgid", proc.pid); ...; reaper.untrack("pgid", proc.pid)

Run as a script (`python -I reaper.py OWNER_PID`) it is the watcher: standard library only, so it
starts in milliseconds and cannot fail on a broken environment.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

SHM_PREFIX = "xdit_usp"  # ShmArena names are f"{SHM_PREFIX}_{owner pid}_{random}"
KINDS = ("pgid", "pid", "path")

_lock = threading.Lock()
_proc: "subprocess.Popen | None" = None


def _send(line: str):
    global _proc
    with _lock:
        if _proc is None or _proc.poll() is not None:
            _proc = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in the owner's terminal must not reach it
                text=True, bufsize=1,
            )
        try:
            _proc.stdin.write(line + "\n")
            _proc.stdin.flush()
        except OSError:  # the watcher is gone (killed by hand): the next call starts another
            _proc = None


def track(kind: str, value):
    """Remove/kill `value` if this process dies before `untrack` is called."""
    assert kind in KINDS and "\n" not in str(value)
    _send(f"+{kind} {value}")


def untrack(kind: str, value):
    assert kind in KINDS
    if _proc is not None:
        _send(f"-{kind} {value}")


def shm_segments(owner_pid: int) -> list[str]:
    """Names under /dev/shm of the arenas that process `owner_pid` created."""
    return [os.path.basename(p) for p in glob.glob(f"/dev/shm/{SHM_PREFIX}_{owner_pid}_*")]


# ---- the watcher process --------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _reap(owner_pid: int, held: dict[str, set]):
    pgids, pids = held["pgid"], held["pid"]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for g in pgids:
            try:
                os.killpg(int(g), sig)
            except (ProcessLookupError, PermissionError):
                pass
        for p in pids:
            try:
                os.kill(int(p), sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any(_alive(int(p)) for p in pids | pgids):
            time.sleep(0.05)
    for path in held["path"]:
        shutil.rmtree(path, ignore_errors=True)
    for name in shm_segments(owner_pid):
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass


def _watch(owner_pid: int):
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # only the owner's end of the pipe ends this process
    held: dict[str, set] = {k: set() for k in KINDS}
    for line in sys.stdin:  # returns at EOF: the owner has exited, however it ended
        op, kind, value = line[0], *line[1:].rstrip("\n").split(" ", 1)
        (held[kind].add if op == "+" else held[kind].discard)(value)
    _reap(owner_pid, held)


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
