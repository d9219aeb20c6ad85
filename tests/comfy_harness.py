"""Boot a real ComfyUI checkout in-process (CPU) and run API prompts through its own executor.

COMFYUI_DIR must point at the checkout; the interpreter must have ComfyUI's requirements.
Our pack is registered through ComfyUI's custom node loader (nodes.load_custom_node), exactly as
ComfyUI does for custom_nodes/<pack>.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid

import workflow_utils as W
from procs import wait_worker_processes, worker_processes  # noqa: F401 (served to the ComfyUI tests)

_booted = None


class ComfyUnavailable(RuntimeError):
    pass


def boot_or_skip():
    """boot(), or skip the calling test module (module level) with the reason ComfyUI is unavailable."""
    try:
        return boot()
    except Exception as e:  # noqa: BLE001 - any import failure of the checkout means "not available"
        import pytest

        pytest.skip(f"needs a ComfyUI checkout in COMFYUI_DIR that imports ({type(e).__name__}: {e})",
                    allow_module_level=True)


def nodes_or_skip():
    """boot(), or skip the calling test (not its module, which may have tests that need no ComfyUI)
    with the reason ComfyUI is unavailable."""
    import pytest

    if not os.environ.get("COMFYUI_DIR"):
        pytest.skip("COMFYUI_DIR is not set: the V3 nodes need ComfyUI's comfy_api")
    try:
        return boot()
    except ComfyUnavailable as e:
        pytest.skip(str(e))


def boot():
    """Import ComfyUI (CPU mode), load its built-in nodes and our pack; returns the `nodes` module."""
    global _booted
    if _booted is not None:
        return _booted
    d = os.environ.get("COMFYUI_DIR")
    if not d or not os.path.isfile(os.path.join(d, "comfy", "model_management.py")):
        raise ComfyUnavailable(f"COMFYUI_DIR={d!r} is not a ComfyUI checkout")
    if d not in sys.path:
        sys.path.insert(0, d)
    argv = sys.argv
    sys.argv = ["main.py", "--cpu", "--disable-all-custom-nodes"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401  (parses the args)
        import nodes
    except Exception as e:  # noqa: BLE001
        raise ComfyUnavailable(f"ComfyUI at {d} does not import: {type(e).__name__}: {e}") from e
    finally:
        sys.argv = argv
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if "XDitUSPWanVideoModelLoader" not in nodes.NODE_CLASS_MAPPINGS:
        ok = asyncio.run(nodes.load_custom_node(W.ROOT))
        if not ok:
            raise RuntimeError("ComfyUI failed to load the pack as a custom node (see log)")
    _booted = nodes
    return nodes


def pack_module():
    """The pack as ComfyUI imported it (its module-level group cache is the one in use)."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["XDitUSPWanVideoModelLoader"]
    return sys.modules[cls.__module__.rsplit(".", 1)[0]]


# Latents kept by the CaptureLatent output node, by key (tests read and clear it).
CAPTURED: dict = {}


class CaptureLatent:
    """Test output node: keeps the latent it receives, so prompts validate and tests read results."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "key": ("STRING", {"default": "out"})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "keep"
    CATEGORY = "testing"

    def keep(self, samples, key):
        CAPTURED[key] = samples["samples"].clone()
        return {}


class RandomConditioning:
    """CONDITIONING made of a fixed random tensor (no text encoder needed)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "tokens": ("INT", {"default": 512, "min": 1, "max": 4096}),
                             "dim": ("INT", {"default": 4096, "min": 1, "max": 8192})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, tokens, dim):
        import torch

        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, dim, generator=g), {}]],)


class ServerStub:
    """What PromptExecutor needs from server.PromptServer; records every message, and when it came
    (`times`, time.perf_counter, one per message)."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages = []
        self.times = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))
        self.times.append(time.perf_counter())

    def queue_updated(self):
        pass


class Runner:
    def __init__(self):
        import execution

        self.server = ServerStub()
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})

    def validate(self, prompt: dict):
        import execution

        return asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))

    def run(self, prompt: dict, outputs: list[str]):
        """Validate and execute `prompt` (up to the output nodes `outputs`); returns the messages.
        Raises RuntimeError carrying ComfyUI's execution_error message on failure."""
        valid = self.validate(prompt)
        if not valid[0]:
            raise AssertionError(f"prompt failed validation: {valid[1]} {valid[3]}")
        self.server.messages.clear()
        self.server.times.clear()
        self.executor.execute(prompt, str(uuid.uuid4()), {"client_id": "test"}, outputs)
        errors = [d for e, d in self.server.messages if e == "execution_error"]
        if errors or not self.executor.success:
            e = errors[0] if errors else {}
            raise ExecutionFailed(e.get("exception_type", "?"), e.get("exception_message", "execution failed"), e)
        return self.server.messages


class ExecutionFailed(RuntimeError):
    def __init__(self, typ, message, data):
        super().__init__(f"{typ}: {message}")
        self.type, self.message, self.data = typ, message, data


class Server:
    """A real ComfyUI server (`main.py --cpu`) in a subprocess on 127.0.0.1, driven over HTTP as a user's
    browser drives it. `base_dir` is its --base-directory (custom_nodes/, models/, output/ ...); its
    log is base_dir/server.log. Use as a context manager: leaving stops it (SIGINT, as Ctrl+C)."""

    def __init__(self, base_dir: str, start_timeout: float = 300.0):
        import socket
        import subprocess

        d = os.environ.get("COMFYUI_DIR")
        if not d:
            raise ComfyUnavailable("COMFYUI_DIR is not set")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path = os.path.join(base_dir, "server.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(d, "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                 "--base-directory", base_dir, "--database-url", "sqlite:///:memory:", "--disable-api-nodes"],
                cwd=d, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        deadline = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.request("GET", "/system_stats")
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"ComfyUI did not answer within {start_timeout:.0f}s:\n{self.log_tail()}")
                time.sleep(0.5)

    def log_tail(self, n: int = 40) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def request(self, method: str, path: str, body=None):
        import json
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
        return json.loads(text) if text.strip() else None

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Queue `prompt` (POST /prompt) and wait for its history entry; raises unless it succeeded."""
        prompt_id = self.request("POST", "/prompt", {"prompt": prompt, "client_id": "xdit-usp-test"})["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.request("GET", f"/history/{prompt_id}").get(prompt_id)
            if entry is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    raise RuntimeError(f"prompt failed: {status.get('messages')}\n{self.log_tail()}")
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f}s:\n{self.log_tail()}")

    def free(self, **flags):
        """POST /free, e.g. free(unload_models=True): what the UI's "Unload models" button sends."""
        self.request("POST", "/free", flags)

    def stop(self):
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
