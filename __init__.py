"""comfyui-xdit-usp: WanVideo (Wan 2.1/2.2) on N GPUs in ComfyUI with xDiT/USP sequence parallelism.

ComfyUI imports this folder as a custom node pack (NODE_CLASS_MAPPINGS below). Importing it outside
ComfyUI is fine too: nothing here imports ComfyUI until a node runs.
"""
if __package__:  # a package: ComfyUI's custom-node loader, a pip install, `python -m comfyui_xdit_usp`
    from .nodes_xdit_usp_loader import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # a bare module (pytest collecting the checkout's root as a directory named e.g. "tmp.x1"): no nodes
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
