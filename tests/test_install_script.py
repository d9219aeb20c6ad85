"""install_xdit_usp.sh: help, dry run and failure paths (fast; no network, nothing installed).

The full install (clean venv, real pip, the CPU self-tests, run twice for idempotence) needs the
network and about a minute, so it is run by hand; these tests pin the script's interface and error paths.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "install_xdit_usp.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(*args, env_extra=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    env.update(env_extra or {})
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=env)


def stub(tmp_path, name, body):
    """A fake interpreter: a shell script standing in for python."""
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(p)


def test_help():
    r = run("--help")
    assert r.returncode == 0, r.stderr
    for opt in ("--python PATH", "--no-cuda-extra", "--skip-self-test", "--dry-run", "--help"):
        assert opt in r.stdout
    assert "Usage: bash install_xdit_usp.sh" in r.stdout
    assert r.stderr == ""
    assert run("-h").stdout == r.stdout


def test_unknown_option_is_a_usage_error():
    r = run("--frobnicate")
    assert r.returncode == 2
    assert "unknown option: --frobnicate" in r.stderr and "Usage:" in r.stderr
    r = run("--python")
    assert r.returncode == 2 and "--python needs a path" in r.stderr


def test_dry_run_changes_nothing():
    pytest.importorskip("torch")
    r = run("--python", sys.executable, "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert f"Python     {sys.executable}" in out
    assert re.search(r"torch      \d+\.\d+", out)
    would = [ln for ln in out.splitlines() if "[dry-run] would run:" in ln]
    req = os.path.join(ROOT, "requirements.txt")
    assert any("-m pip install --constraint" in ln and ln.endswith(f"-r {req}") for ln in would), out
    # the constraint file pins the torch that is installed; torch itself is never an install target
    assert not any(re.search(r"\s'?torch[=<>]", ln) for ln in would), out
    assert "nothing was installed" in out
    assert not any(ln.startswith("[xdit-usp] $ ") for ln in out.splitlines()), "dry run executed a command"
    assert "self-test:" not in out and "checking imports" not in out


def test_dry_run_respects_no_cuda_extra_and_skip_self_test():
    pytest.importorskip("torch")
    r = run("--python", sys.executable, "--dry-run", "--no-cuda-extra", "--skip-self-test")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "xfuser" not in "\n".join(ln for ln in r.stdout.splitlines() if "would run" in ln)
    assert "self-tests would run" not in r.stdout


def test_nonexistent_python_fails_with_hint():
    r = run("--python", "/nonexistent/bin/python", "--dry-run")
    assert r.returncode == 1
    assert "does not exist" in r.stderr
    assert "--python /path/to/ComfyUI/venv/bin/python" in r.stderr


def test_python_env_var_is_used():
    r = run("--dry-run", env_extra={"PYTHON": "/nonexistent/python3"})
    assert r.returncode == 1 and "/nonexistent/python3" in r.stderr and "$PYTHON" in r.stderr


def test_old_python_is_refused(tmp_path):
    py = stub(tmp_path, "python", 'echo 3.8.10\n')
    r = run("--python", py, "--dry-run")
    assert r.returncode == 1
    assert "Python 3.8.10 is too old" in r.stderr and ">= 3.10" in r.stderr


def test_missing_torch_is_never_installed(tmp_path):
    # -S: no site-packages, so the real interpreter runs but cannot import torch
    py = stub(tmp_path, "python", f'exec "{sys.executable}" -S "$@"\n')
    r = run("--python", py, "--dry-run")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "torch is not importable" in r.stderr
    assert "Install ComfyUI (and its torch build" in r.stderr and "never installs torch" in r.stderr
    assert "pip install" not in r.stdout


def test_failed_step_trips_the_err_trap(tmp_path):
    pytest.importorskip("torch")
    # the real interpreter, except that every `-m pip install` fails (no network is touched)
    py = stub(tmp_path, "python", (
        'if [ "$1" = -m ] && [ "$2" = pip ] && [ "$3" = install ]; then echo "simulated pip failure" >&2; exit 1; fi\n'
        f'exec "{sys.executable}" "$@"\n'))
    r = run("--python", py)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "simulated pip failure" in r.stderr
    assert "ERROR: step failed (exit 1)" in r.stderr and "Troubleshooting:" in r.stderr


def test_pins_match_pyproject():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]

    def norm(spec):
        return re.sub(r"\s+", "", spec)

    with open(os.path.join(ROOT, "requirements.txt")) as f:
        reqs = [ln.split("#")[0].strip() for ln in f]
    reqs = [norm(r) for r in reqs if r]
    assert reqs == [norm(d) for d in project["dependencies"]]
    script = open(SCRIPT).read()
    xfuser = re.search(r'^XFUSER_SPEC="([^"]+)"', script, re.M).group(1)
    assert [xfuser] == project["optional-dependencies"]["cuda"]
    min_torch = re.search(r'^MIN_TORCH="([^"]+)"', script, re.M).group(1)
    assert f"torch>={min_torch}" in project["dependencies"]
    assert os.access(SCRIPT, os.X_OK)
    assert script.startswith("#!/usr/bin/env bash\n") and "set -Eeuo pipefail" in script
