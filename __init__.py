"""comfyui-xdit-usp: WanVideo (Wan 2.1/2.2) on N GPUs in ComfyUI with xDiT/USP sequence parallelism.

ComfyUI imports this folder as a custom node pack (NODE_CLASS_MAPPINGS below). Importing it outside
ComfyUI is fine too: nothing here imports ComfyUI until a node runs.
"""
from .nodes_xdit_usp_loader import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
