"""Every test imports this checkout's files as `comfyui_xdit_usp`, and only under that name."""
import workflow_utils

workflow_utils.load_pack()
