"""The runtime: sequence-parallel Wan on torchrun workers. Imports nothing from ComfyUI.

    from comfyui_xdit_usp.parallel import XDitUSPConfig, WorkerGroup
"""
from .config import Layout, XDitUSPConfig
from .launcher import WorkerError, WorkerGroup, close_all_groups, get_group

__all__ = ["XDitUSPConfig", "Layout", "WorkerGroup", "WorkerError", "get_group", "close_all_groups"]
