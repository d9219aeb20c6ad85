"""The parallel Wan VAE against ComfyUI's own VAE code (COMFYUI_DIR), and its nodes in a real graph.

* ComfyUI's ``comfy.ldm.wan.vae.WanVAE`` (2.1) and ``vae2_2.WanVAE`` (2.2), holding the tiny VAE's
  weights under their own names, decode and encode; worker groups of 2 and 4 CPU ranks must agree
  to 1e-5 (latent height 5: divisible by neither). ComfyUI's VAE wrapper hard-codes the 2.2 VAE's
  width (160), so the modules are built directly for this comparison.
* A prompt through ComfyUI's executor: VAELoader (the tiny 2.1 VAE as a file) -> native VAEDecode
  and XDit+USP VAE Decode of the same latent, native VAEEncode and XDit+USP VAE Encode of the same
  frames: the IMAGE and the LATENT must match (shape, layout, value range) to 1e-5.
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_harness as H  # noqa: E402

NODES = H.boot_or_skip()

import folder_paths  # noqa: E402

import comfy.ldm.wan.vae as comfy_vae21  # noqa: E402
import comfy.ldm.wan.vae2_2 as comfy_vae22  # noqa: E402
import comfy.model_management as mm  # noqa: E402

PACK = H.pack_module()
PAR = importlib.import_module(PACK.__name__ + ".parallel")
LAUNCHER = importlib.import_module(PACK.__name__ + ".parallel.launcher")
TINY = importlib.import_module(PACK.__name__ + ".parallel.tiny")
from safetensors.torch import save_file  # noqa: E402

TOL = 1e-5
LATENT = (2, 5, 6)


def comfy_module(version: str, state: dict) -> torch.nn.Module:
    """ComfyUI's own Wan VAE module for the tiny config, with `state` (ComfyUI's names) loaded."""
    cfg = TINY.tiny_vae_config(version)
    common = dict(dim=cfg["base_dim"], z_dim=cfg["z_dim"], dim_mult=cfg["dim_mult"], num_res_blocks=cfg["num_res_blocks"],
                  attn_scales=[], temperal_downsample=cfg["temperal_downsample"], dropout=0.0)
    m = comfy_vae22.WanVAE(dec_dim=cfg["decoder_base_dim"], **common) if version == "2.2" else comfy_vae21.WanVAE(**common)
    m.load_state_dict(state, strict=True)
    return m.eval().float()


@pytest.fixture(scope="module")
def cases():
    """{version: (ComfyUI state dict, {(version, encode): (input, ComfyUI's output)})}."""
    out = {}
    g = torch.Generator().manual_seed(9)
    for v in TINY.VAE_VERSIONS:
        state = TINY.vae_comfy_state_dict(TINY.build_vae(v, seed=4), v)
        m = comfy_module(v, state)
        s = 16 if v == "2.2" else 8
        z = torch.randn(1, TINY.tiny_vae_config(v)["z_dim"], *LATENT, generator=g)
        x = torch.rand(1, 3, 1 + 4 * (LATENT[0] - 1), LATENT[1] * s, LATENT[2] * s, generator=g) * 2 - 1
        with torch.no_grad():
            # ComfyUI's decode leaves the clamp to VAE.process_output ((x + 1) / 2 clamped to [0, 1]);
            # diffusers' clamps to [-1, 1]: the same values
            out[v] = (state, {False: (z, m.decode(z).float().clamp(-1, 1)), True: (x, m.encode(x).float())})
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def group(request):
    # registered, so the graph test's Config node (2 CPU ranks) finds it running and reuses it
    g = LAUNCHER.get_group(PAR.XDitUSPConfig(world_size=request.param, device="cpu", dtype="fp32",
                                             launch_timeout_s=120, forward_timeout_s=120))
    yield g
    LAUNCHER.close_group(g)


@pytest.mark.parametrize("version", ["2.1", "2.2"])
@pytest.mark.parametrize("encode", [False, True], ids=["decode", "encode"])
def test_parity_with_comfyui_vae(group, cases, version, encode):
    state, io = cases[version]
    x, ref = io[encode]
    key = group.vae_load(state, "fp32")
    out = (group.vae_encode if encode else group.vae_decode)(key, x)
    err = TINY.rel_err(out, ref)
    print(f"\n{group.config.world_size} ranks vs ComfyUI, Wan {version} {'encode' if encode else 'decode'}: "
          f"max_rel_err {err:.2e}")
    assert out.shape == ref.shape and err <= TOL


# ------------------------------------------------------------------------------ the nodes in a graph
class XDitVaeTestLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed):
        g = torch.Generator().manual_seed(seed)
        return ({"samples": torch.randn(1, 16, *LATENT, generator=g)},)


class XDitVaeTestFrames:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed):  # 5 frames, 42 x 50: cropped to 40 x 48 by the VAE's own crop, as natively
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(5, 42, 50, 3, generator=g),)


CAPTURED: dict = {}


class XDitVaeTestCapture:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": "out"})},
                "optional": {"images": ("IMAGE",), "latent": ("LATENT",)}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "keep"
    CATEGORY = "testing"

    def keep(self, key, images=None, latent=None):
        CAPTURED[key] = images.clone() if images is not None else latent["samples"].clone()
        return {}


NODES.NODE_CLASS_MAPPINGS.update({"XDitVaeTestLatent": XDitVaeTestLatent, "XDitVaeTestFrames": XDitVaeTestFrames,
                                  "XDitVaeTestCapture": XDitVaeTestCapture})


@pytest.fixture(scope="module")
def vae_file(cases):
    d = tempfile.mkdtemp(prefix="xdit_vae_test_")
    save_file({k: v.contiguous() for k, v in cases["2.1"][0].items()}, os.path.join(d, "tiny_wan21_vae.safetensors"))
    folder_paths.add_model_folder_path("vae", d)
    yield "tiny_wan21_vae.safetensors"
    LAUNCHER.close_all_groups()
    mm.unload_all_models()
    folder_paths.folder_names_and_paths["vae"][0].remove(d)
    folder_paths.filename_list_cache.clear()
    shutil.rmtree(d, ignore_errors=True)


def test_nodes_in_a_graph_match_native(group, vae_file):
    if group.config.world_size != 2:
        pytest.skip("the graph runs once, on the 2-rank group")
    cfg = {"class_type": "XDitUSPConfigNode", "inputs": dict(
        gpus=2, ulysses_degree=0, ring_degree=0, cfg_degree=0, dtype="fp32", attention_backend="auto",
        gpu_memory_fraction=1.0, device="cpu")}
    prompt = {
        "cfg": cfg,
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": vae_file}},
        "latent": {"class_type": "XDitVaeTestLatent", "inputs": {"seed": 1}},
        "frames": {"class_type": "XDitVaeTestFrames", "inputs": {"seed": 2}},
        "dec_native": {"class_type": "VAEDecode", "inputs": {"samples": ["latent", 0], "vae": ["vae", 0]}},
        "dec_ours": {"class_type": "XDitUSPVAEDecode",
                     "inputs": {"samples": ["latent", 0], "vae": ["vae", 0], "xdit_usp_config": ["cfg", 0]}},
        "enc_native": {"class_type": "VAEEncode", "inputs": {"pixels": ["frames", 0], "vae": ["vae", 0]}},
        "enc_ours": {"class_type": "XDitUSPVAEEncode",
                     "inputs": {"pixels": ["frames", 0], "vae": ["vae", 0], "xdit_usp_config": ["cfg", 0]}},
    }
    for name in ("dec_native", "dec_ours"):
        prompt["c_" + name] = {"class_type": "XDitVaeTestCapture", "inputs": {"key": name, "images": [name, 0]}}
    for name in ("enc_native", "enc_ours"):
        prompt["c_" + name] = {"class_type": "XDitVaeTestCapture", "inputs": {"key": name, "latent": [name, 0]}}
    CAPTURED.clear()
    H.Runner().run(prompt, [k for k in prompt if k.startswith("c_")])
    import comfy.sd

    # a Wan VAE object's process_output is ComfyUI's default: the ranks make the IMAGE themselves
    assert importlib.import_module(PACK.__name__ + ".nodes_xdit_usp_vae")._wan_process_output(
        comfy.sd.VAE(sd={k: v.clone() for k, v in TINY.vae_comfy_state_dict(TINY.build_vae("2.1"), "2.1").items()}))
    native, ours = CAPTURED["dec_native"], CAPTURED["dec_ours"]
    assert ours.shape == native.shape == (5, 40, 48, 3) and ours.dtype == native.dtype
    assert 0.0 <= ours.min() and ours.max() <= 1.0
    dec_err = TINY.rel_err(ours, native)
    enc_native, enc_ours = CAPTURED["enc_native"], CAPTURED["enc_ours"]
    assert enc_ours.shape == enc_native.shape == (1, 16, 2, 5, 6)
    enc_err = TINY.rel_err(enc_ours, enc_native)
    print(f"\ngraph, 2 ranks vs native VAEDecode {dec_err:.2e}, vs native VAEEncode {enc_err:.2e}")
    assert dec_err <= TOL and enc_err <= TOL
    assert group.alive and group.vae is not None  # the nodes used this running group, not a new one
    assert LAUNCHER.registered_groups() == [group]
