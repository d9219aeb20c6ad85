"""The runtime: sequence-parallel Wan on torchrun workers. Imports nothing from ComfyUI.

    from comfyui_xdit_usp.parallel import XDitUSPConfig, WorkerGroup

The config imports no torch, so checking one (the CLI's errors, ComfyUI's start-up) stays fast;
the launcher (and torch) is imported on first use of its names.
"""
from .config import ConfigError, Layout, XDitUSPConfig

_LAUNCHER_NAMES = ("WorkerGroup", "WorkerError", "get_group", "close_all_groups")

__all__ = ["XDitUSPConfig", "ConfigError", "Layout", *_LAUNCHER_NAMES]


def __getattr__(name):
    if name in _LAUNCHER_NAMES:
        from . import launcher

        return getattr(launcher, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
