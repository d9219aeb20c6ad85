"""Reliability of the worker group on real processes (torchrun + gloo, CPU): what listens where,
how fast a dead, hung or stopped rank is reported, what is checked before launch, and what is left
behind when the owner is interrupted, terminated or killed.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from multiprocessing import connection as mpc

import pytest

from comfyui_xdit_usp.parallel import ConfigError, WorkerError, WorkerGroup, XDitUSPConfig, tiny, transport
from procs import group_processes, listening_addresses, processes_with_env, shm_segments, wait_gone, wait_until
from workflow_utils import BIND_PACK, CLI

SIZE = (3, 6, 10)  # latent frames, h, w: 45 tokens


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "t2v.safetensors"
    return tiny.write_original_checkpoint(tiny.build_model("t2v"), path)


def config(world=2, **kw) -> XDitUSPConfig:
    kw.setdefault("launch_timeout_s", 120)
    kw.setdefault("forward_timeout_s", 120)
    return XDitUSPConfig(world_size=world, device="cpu", dtype="fp32", **kw)


def inputs():
    return tiny.random_inputs("t2v", 2, *SIZE)


# ---- 1. loopback only ------------------------------------------------------------------------------
def test_every_listening_socket_of_a_group_is_on_loopback(ckpt):
    with WorkerGroup(config()) as group:
        group.load("m", ckpt)
        group.forward("m", inputs())  # gloo's pairs exist once a collective ran
        addresses = listening_addresses([group.proc.pid, *group.pids])
    # torchrun's store (agent) and gloo's pair listeners (ranks) at least
    assert len(addresses) >= 3, addresses
    assert all(a.startswith("127.0.0.1:") for a in addresses), addresses


# ---- 2. liveness in seconds --------------------------------------------------------------------------
def test_a_stopped_rank_is_reported_within_15_s(ckpt):
    group = WorkerGroup(config(forward_timeout_s=900), env={"XDIT_USP_FAULT": "forward_stop@1"})
    group.load("m", ckpt)
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as e:
        group.forward("m", inputs())
    took = time.monotonic() - t0
    print(f"stopped rank reported after {took:.1f} s")
    assert took < 15
    assert e.value.rank == 1
    msg = str(e.value)
    assert msg.startswith("rank 1 (pid ") and "stopped responding during 'forward'" in msg
    assert "process: stopped by a signal" in msg
    assert "rank 0" not in msg.splitlines()[0]
    assert wait_gone(group.log_dir) == []


def test_a_rank_hung_during_load_is_reported_long_before_the_load_timeout(ckpt):
    # SIGSTOP from outside, while the rank sleeps in load: silent, so reported by the heartbeat.
    group = WorkerGroup(config(load_timeout_s=900), env={"XDIT_USP_FAULT": "load_sleep@0=60"})
    group.start()
    threading.Timer(1.0, os.kill, (group.pids[0], signal.SIGSTOP)).start()
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"^rank 0 \(pid \d+\) stopped responding during 'load'") as e:
        group.load("m", ckpt)
    assert time.monotonic() - t0 < 16
    assert e.value.rank == 0
    assert wait_gone(group.log_dir) == []


def test_a_killed_agent_is_reported_as_such(ckpt):
    group = WorkerGroup(config(), env={"XDIT_USP_FAULT": "forward_sleep@0=60,forward_sleep@1=60"})
    group.load("m", ckpt)
    threading.Timer(1.0, os.kill, (group.proc.pid, signal.SIGKILL)).start()
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"^torchrun's agent \(pid \d+\) exited \(killed by signal 9\)") as e:
        group.forward("m", inputs())
    assert time.monotonic() - t0 < 15
    assert e.value.rank is None
    assert wait_gone(group.log_dir) == []


def test_a_dead_idle_rank_makes_the_next_load_relaunch(ckpt):
    group = WorkerGroup(config())
    group.load("m", ckpt)
    os.kill(group.pids[1], signal.SIGKILL)
    assert wait_until(lambda: group.alive, timeout=10) is False
    with pytest.raises(WorkerError, match=r"^rank 1 \(pid \d+\) exited before 'forward' \(while idle\)") as e:
        group.forward("m", inputs())
    assert e.value.rank == 1
    group.load("m", ckpt)  # relaunches instead of failing on a dead rank
    assert group.launches == 2
    group.forward("m", inputs())
    group.close()
    assert wait_gone(group.log_dir) == []


# ---- 3. everything knowable is checked before launch ------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    ({"attention_backend": "sdpa", "ring_degree": 2, "ulysses_degree": 1, "cfg_degree": 1},
     r"attention_backend 'sdpa' returns no log-sum-exp, which ring attention \(ring degree 2\) needs"),
    ({"attention_backend": "cudnn"}, r"attention_backend 'cudnn' needs CUDA; with device='cpu'"),
    ({"world_size": 4, "ulysses_degree": 4}, "2 heads: Ulysses 2 works, 4 does not"),
    # 4 ranks, cfg 2 × Ulysses 2 runs batch 2; a batch-1 call would need ring, which sdpa cannot do
    ({"world_size": 4, "attention_backend": "sdpa"}, r"the batch-1 layout cfg1xulysses2xring2 uses ring"),
])
def test_a_config_that_cannot_run_the_model_fails_before_launch(kw, match, ckpt):
    group = WorkerGroup(config(**{"world": kw.pop("world_size", 2)}, **kw))
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=match):
        group.load("m", ckpt)
    assert time.monotonic() - t0 < 3
    assert group.launches == 0 and group.proc is None


def test_config_errors_speak_the_interface_words():
    with pytest.raises(ConfigError) as e:
        XDitUSPConfig(world_size=3, ulysses_degree=2, device="cpu").validate()
    cli = e.value.render({"world_size": "--gpus", "ulysses_degree": "--ulysses", "ring_degree": "--ring",
                          "cfg_degree": "--cfg"})
    assert cli.startswith("--ulysses × --ring × --cfg must equal --gpus 3")
    with pytest.raises(ConfigError) as e:
        XDitUSPConfig(world_size=2, device="cuda").validate(visible_gpus=0)
    assert "use --device cpu" in e.value.render({"device='cpu'": "--device cpu"})
    assert "world_size" not in e.value.render({"world_size": "gpus"})


def cli(*args, env=None, timeout=120):
    return subprocess.run([*CLI, "run", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args,expect", [
    (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["--frames", "10"], "argument --frames: must be 4k+1"),
    (["--timeout", "-1"], "argument --timeout: must be > 0 seconds"),
    (["--attention", "sdpa", "--ring", "2"], "error: --attention 'sdpa' returns no log-sum-exp"),
    (["--attention", "cudnn"], "error: --attention 'cudnn' needs CUDA; with --device cpu use"),
    (["--gpus", "3", "--ulysses", "2"], "error: --ulysses × --ring × --cfg must equal --gpus 3"),
    (["--gpus", "4", "--ulysses", "4"], "error: 2 heads: Ulysses 2 works, 4 does not"),
    (["--checkpoint", "/nonexistent/wan.safetensors"], "error: --checkpoint /nonexistent/wan.safetensors: no such file"),
])
def test_cli_user_errors_are_one_line_and_exit_2(args, expect, tmp_path):
    env = {"TMPDIR": str(tmp_path)}
    marker = f"TMPDIR={tmp_path}"
    t0 = time.monotonic()
    r = cli("--device", "cpu", *args, env=env)
    took = time.monotonic() - t0
    print(f"{args}: {took:.2f} s")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert ours(tmp_path) == []  # nothing built, nothing launched
    assert processes_with_env(marker) == []


def test_cli_no_visible_gpu_is_a_user_error():
    r = cli("--device", "cuda", env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2
    assert r.stderr.startswith("error: 2 GPU(s) requested but no CUDA device is visible") and "--device cpu" in r.stderr


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cli_parity_is_measured_against_an_fp32_reference(dtype):
    """`run --parity` (the default for the embedded model): the group's output against a plain
    single-process fp32 forward; in bf16 also one process's bf16 error, and their ratio (issue 13)."""
    import json

    r = cli("--device", "cpu", "--gpus", "2", "--ulysses", "2", "--batch", "1", "--steps", "1",
            "--dtype", dtype, "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if dtype == "fp32":
        assert out["max_rel_err"] <= 1e-5 and out["rel_l2"] <= 1e-5
        assert out["parity_ratio"] is None and out["floor_rel_l2"] is None
    else:
        assert 1e-4 < out["floor_rel_l2"] < 2e-2  # bf16 rounding, measured: it is not zero
        assert out["parity_ratio"] <= 1.5, out
        assert "ratio" in r.stdout and "relative L2" in r.stdout


def test_cli_help_shows_the_defaults():
    r = subprocess.run([*CLI, "run", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for default in ("(default: 2)", "(default: 3)", "(default: 900.0)", "(default: auto)"):
        assert default in text
    assert "(default: None)" not in text


# ---- 5. nothing left behind ----------------------------------------------------------------------------
OWNER = BIND_PACK + """
import os, sys, time
from comfyui_xdit_usp.parallel import WorkerGroup, XDitUSPConfig, tiny
g = WorkerGroup(XDitUSPConfig(world_size=2, device="cpu", dtype="fp32"), env={env!r})
g.load("m", {ckpt!r})
g.forward("m", tiny.random_inputs("t2v", 2, 3, 6, 10))  # the shared-memory arena exists now
print(g.log_dir, flush=True)
{then}
"""


def _default_sigint():
    """In the child before exec: SIGINT's default action, so that Python installs its KeyboardInterrupt
    handler there even when this test runs with SIGINT ignored (a background job of a
    non-interactive shell, `cmd &`, starts so and passes it on)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_owner(tmp_path, ckpt, then="time.sleep(600)", env=None):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(OWNER.format(ckpt=str(ckpt), then=then, env=env or {})))
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "TMPDIR": str(tmpdir)}, preexec_fn=_default_sigint)
    log_dir = owner.stdout.readline().strip()
    assert log_dir, owner.stderr.read()
    assert log_dir.startswith(str(tmpdir))
    assert len(group_processes(log_dir)) >= 3  # torchrun's agent, 2 ranks (and their resource trackers)
    assert shm_segments(owner.pid)
    return owner, log_dir, tmpdir


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_nothing_outlives_an_owner_ended_by_a_signal(sig, tmp_path, ckpt):
    owner, log_dir, tmpdir = start_owner(tmp_path, ckpt)
    try:
        t0 = time.monotonic()
        owner.send_signal(sig)
        owner.wait(15)
        assert wait_gone(log_dir, timeout=15) == []
        assert wait_until(lambda: shm_segments(owner.pid), timeout=15) == []
        assert wait_until(lambda: ours(tmpdir), timeout=15) == []  # logs, torchelastic_*, tiny checkpoints
        print(f"{sig.name}: clean after {time.monotonic() - t0:.1f} s")
        assert "leaked shared_memory" not in owner.stderr.read()
    finally:
        owner.kill()
        owner.wait()


def test_a_failed_groups_logs_live_as_long_as_its_owner(tmp_path, ckpt):
    then = textwrap.dedent("""
        os.kill(g.pids[1], 9)
        try:
            g.forward("m", tiny.random_inputs("t2v", 2, 3, 6, 10))
        except Exception as e:
            print(os.path.isdir(g.log_dir), str(e).splitlines()[0], flush=True)
        time.sleep(600)
    """)
    owner, log_dir, tmpdir = start_owner(tmp_path, ckpt, then=then)
    try:
        kept, first_line = owner.stdout.readline().split(" ", 1)
        assert kept == "True" and first_line.startswith("rank 1 (pid ")
        assert os.path.isdir(log_dir)
        owner.kill()
        owner.wait()
        assert wait_until(lambda: ours(tmpdir), timeout=15) == []
    finally:
        owner.kill()
        owner.wait()


def test_ctrl_c_in_the_cli_exits_within_a_second_quietly(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "XDIT_USP_FAULT": "forward_sleep@0=600,forward_sleep@1=600"}
    p = subprocess.Popen([*CLI, "run", "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_sigint)
    try:
        def log_dir():
            return next((os.path.join(tmp_path, f) for f in os.listdir(tmp_path) if f.startswith("xdit_usp_logs_")), "")

        def in_forward():  # both ranks print this from the fault hook as they start sleeping
            return all("forward_sleep" in _read(os.path.join(log_dir(), f"rank{r}.log")) for r in (0, 1))

        assert wait_until(lambda: not in_forward(), timeout=120) is False
        log_dir = log_dir()
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=15)
        took = time.monotonic() - t0
        print(f"Ctrl-C: exited after {took:.2f} s")
        assert p.returncode == 130
        assert took <= 1.5
        assert "Traceback" not in err and "KeyboardInterrupt" not in err
        assert err.strip() == "interrupted"
        assert wait_gone(log_dir) == []
        assert wait_until(lambda: ours(tmp_path), timeout=15) == []
    finally:
        p.kill()
        p.wait()


def ours(folder) -> list[str]:
    """What the pack or torchrun left in a TMPDIR (torch's own caches, e.g. torchinductor_*, aside)."""
    return [f for f in os.listdir(folder) if f.startswith(("xdit_usp", "torchelastic_"))]


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


# ---- 7. a silent connection cannot stall startup ------------------------------------------------------------
def test_silent_connections_are_dropped_and_delay_no_one():
    key = transport.new_authkey()
    listener = transport.ControlListener(key)
    silent = [socket.create_connection(listener.address) for _ in range(10)]
    try:
        t0 = time.monotonic()
        client = mpc.Client(tuple(listener.address), authkey=key)
        conn = listener.accept(5)
        took = time.monotonic() - t0
        assert conn is not None and took < 1.0, took
        client.send("hi")
        assert conn.recv() == "hi"
        assert wait_until(lambda: listener.rejected < 10, timeout=5) is False  # each dropped after 2 s
    finally:
        for s in silent:
            s.close()
        listener.close()


def test_a_wrong_key_is_refused():
    listener = transport.ControlListener(transport.new_authkey())
    try:
        with pytest.raises((mpc.AuthenticationError, EOFError, ConnectionError)):
            mpc.Client(tuple(listener.address), authkey=b"x" * 32)
        assert listener.accept(0.5) is None
    finally:
        listener.close()
