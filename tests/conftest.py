"""Every test imports this checkout's files as `comfyui_xdit_usp`, and only under that name."""
import pytest
import workflow_utils

workflow_utils.load_pack()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{variant: (path of a tiny random checkpoint in the original Wan layout, the model it holds)}."""
    from comfyui_xdit_usp.parallel import tiny

    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for i, v in enumerate(tiny.VARIANTS):
        model = tiny.build_model(v, seed=i)
        out[v] = (tiny.write_original_checkpoint(model, d / f"{v}.safetensors"), model)
    return out
