"""comfyui-xdit-usp: WanVideo (Wan 2.1/2.2) on N GPUs in ComfyUI with xDiT/USP sequence parallelism.

ComfyUI loads this folder as a custom node pack through `comfy_entrypoint` (its V3 node API).
Importing it outside ComfyUI is fine too: nothing here imports ComfyUI until ComfyUI calls
`comfy_entrypoint`. That includes importing this file as a bare module (pytest collecting the
checkout's root as a directory named e.g. "tmp.x1"), where the relative import below never runs.
"""

WEB_DIRECTORY = None


async def comfy_entrypoint():
    from .nodes_xdit_usp_loader import XDitUSPExtension

    return XDitUSPExtension()


__all__ = ["comfy_entrypoint"]
