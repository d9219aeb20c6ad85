"""Real ComfyUI (COMFYUI_DIR), real executor, real gloo worker groups on the CPU.

Each graph runs twice through ComfyUI's PromptExecutor: once with the native UNETLoader, once with
XDit+USP Config -> XDit+USP WanVideo Model Loader (2 CPU ranks, fp32); the sampled latents must
agree to 1e-4 relative. Tiny random Wan checkpoints in original layout; conditioning comes from
test-only nodes (random text embeddings of text_dim 64; WanImageToVideo-style image conds).
"""
from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workflow_utils as W  # noqa: E402

import comfy_harness as H  # noqa: E402

NODES = H.boot_or_skip()

import folder_paths  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import node_helpers  # noqa: E402

PACK = H.pack_module()
PAR = importlib.import_module(PACK.__name__ + ".parallel")
LAUNCHER = importlib.import_module(PACK.__name__ + ".parallel.launcher")
PROTOCOL = importlib.import_module(PACK.__name__ + ".parallel.protocol")
XM = importlib.import_module(PACK.__name__ + ".xdit_usp_model")
from safetensors.torch import save_file  # noqa: E402

TOL = 1e-4
TEXT_DIM = 64
SAMPLE = dict(width=72, height=48, length=5)  # latent 2 x 6 x 9: W padded to the patch size


# ------------------------------------------------------------------------------ test-only nodes
class _ClipVisionOutput:
    def __init__(self, penultimate_hidden_states):
        self.penultimate_hidden_states = penultimate_hidden_states


class XDitTestImageToVideoConds:
    """What WanImageToVideo adds (concat_latent_image + concat_mask + clip_vision_output), random."""

    CLIP_TOKENS = 257  # one image
    LAST_FRAME = False

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                             "latent": ("LATENT",), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, positive, negative, latent, seed):
        g = torch.Generator().manual_seed(seed)
        s = latent["samples"]
        image = torch.randn(1, 16, *s.shape[2:], generator=g)
        mask = torch.ones(1, 1, *s.shape[2:])
        mask[:, :, :1] = 0.0
        if self.LAST_FRAME:
            mask[:, :, -1:] = 0.0
        clip = _ClipVisionOutput(torch.randn(1, self.CLIP_TOKENS, 1280, generator=g))
        values = {"concat_latent_image": image, "concat_mask": mask, "clip_vision_output": clip}
        return (node_helpers.conditioning_set_values(positive, values),
                node_helpers.conditioning_set_values(negative, values))


class XDitTestFirstLastFrameConds(XDitTestImageToVideoConds):
    """What WanFirstLastFrameToVideo adds: first+last frame latents, mask, both images' CLIP tokens."""

    CLIP_TOKENS = 2 * 257
    LAST_FRAME = True


class XDitTestVaceConds:
    """What WanVaceToVideo adds: control video latent (inactive+reactive, 32 ch), mask (64 ch), strength."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                             "latent": ("LATENT",), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0})}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, positive, negative, latent, seed, strength):
        g = torch.Generator().manual_seed(seed)
        s = latent["samples"]
        frames = torch.randn(1, 32, *s.shape[2:], generator=g)
        mask = (torch.rand(1, 64, *s.shape[2:], generator=g) > 0.5).float()
        values = {"vace_frames": [frames], "vace_mask": [mask], "vace_strength": [strength]}
        return (node_helpers.conditioning_set_values(positive, values, append=True),
                node_helpers.conditioning_set_values(negative, values, append=True))


class XDitTestTI2VLatent:
    """What Wan22ImageToVideoLatent returns with a start image: 48-ch latent, first frame kept (noise_mask 0)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "frames": ("INT", {"default": 3, "min": 1, "max": 64}),
                             "height": ("INT", {"default": 4, "min": 1, "max": 64}),
                             "width": ("INT", {"default": 6, "min": 1, "max": 64})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, frames, height, width):
        g = torch.Generator().manual_seed(seed)
        latent = torch.zeros(1, 48, frames, height, width)
        latent[:, :, :1] = torch.randn(1, 48, 1, height, width, generator=g)
        mask = torch.ones(1, 1, frames, height, width)
        mask[:, :, :1] = 0.0
        return ({"samples": latent, "noise_mask": mask},)


def _not_a_skip(args, extra):  # a block replacement that runs the block (so it is not Skip Layer Guidance)
    return extra["original_block"](args)


class XDitTestInstallPatch:
    """Puts one patch on a MODEL through ModelPatcher's own API, as a model-patching node does.
    kind "method:<name>": ModelPatcher.<name> (a set_model_* method) with an identity patch
    function; "weight:<what>": add_patches with that kind of patch value on one weight."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "kind": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    WEIGHT = "diffusion_model.blocks.0.self_attn.q.weight"  # [256, 256]

    def patch(self, model, kind):
        import inspect

        from comfy.weight_adapter import adapters

        m = model.clone()
        what, _, name = kind.partition(":")
        if what == "method":
            method = getattr(m, name)
            params = list(inspect.signature(method).parameters)
            if name == "set_model_patch":
                method(lambda x, *a, **k: x, "xdit_test_kind")
            elif name == "set_model_patch_replace":
                method(_not_a_skip, "dit", "double_block", 0)
            elif params[1:3] == ["block_name", "number"]:
                method(lambda q, k, v, extra_options=None: q, "input", 0)
            else:
                assert len(params) == 1, (name, params)
                method(lambda *a, **k: a[0] if a else None)
            return (m,)
        zeros = torch.zeros(256, 256)
        adapter = {a.__name__: a for a in adapters}.get(name)
        if adapter is not None:  # only its type matters here: the workers refuse it before using it
            m.add_patches({self.WEIGHT: adapter.__new__(adapter)}, 1.0)
        elif name == "offset":
            m.add_patches({(self.WEIGHT, (0, 0, 128)): ("diff", (torch.zeros(128, 256),))}, 1.0)
        elif name == "function":
            m.add_patches({(self.WEIGHT, None, lambda w: w): ("diff", (zeros,))}, 1.0)
        elif name == "pad_weight":
            m.add_patches({self.WEIGHT: ("diff", (zeros, {"pad_weight": True}))}, 1.0)
        elif what == "object":
            m.add_object_patch(name, lambda *a, **k: None)
        else:  # a tuple kind: ("model_as_lora", ...), an unknown one
            m.add_patches({self.WEIGHT: (name, (zeros,))}, 1.0)
        return (m,)


class _StubVae:
    """What WanInfiniteTalkToVideo asks of a VAE: encode(pixels [F, H, W, 3]) -> a latent
    [1, 16, 1 + (F-1)//4, H/8, W/8] (here a fixed function of the pixels: their 8x8 means, tiled)."""

    def encode(self, pixels):
        f, h, w, _ = pixels.shape
        t = 1 + (f - 1) // 4
        x = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1).float(), 8)  # [F, 3, H/8, W/8]
        x = x[::4][:t].movedim(0, 1).unsqueeze(0)  # [1, 3, t, H/8, W/8]
        return torch.cat([x] * 5 + [x[:, :1]], dim=1) * 2 - 1


_TALK_PATCH = {}


def _talk_patch(dim):
    """A tiny InfiniteTalk MODEL_PATCH: ComfyUI's MultiTalkModelPatch (the class ModelPatchLoader builds
    for a file with audio_proj.proj1.weight) with 2 blocks, audio width 32, random weights; one object
    per width, as one ModelPatchLoader output is reused across runs."""
    if dim not in _TALK_PATCH:
        import comfy.model_patcher
        import comfy.ops
        from comfy_extras.nodes_model_patch import MultiTalkModelPatch

        model = MultiTalkModelPatch(audio_window=5, intermediate_dim=16, in_dim=dim, out_dim=32, context_tokens=32,
                                    vae_scale=4, num_layers=2, device="cpu", dtype=torch.float32,
                                    operations=comfy.ops.manual_cast)
        g = torch.Generator().manual_seed(21)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_((1.0 if name.endswith("norm.weight") or name.endswith("norm_x.weight") else 0.0)
                        + torch.randn(p.shape, generator=g) * 0.05)
        _TALK_PATCH[dim] = comfy.model_patcher.CoreModelPatcher(model, load_device=torch.device("cpu"),
                                                                offload_device=torch.device("cpu"))
    return _TALK_PATCH[dim]


class XDitTestInfiniteTalk:
    """WanInfiniteTalkToVideo (single speaker) run on a synthetic AUDIO_ENCODER_OUTPUT (13 wav2vec2
    layers of [1, frames at 50 fps, 768], what the node reads), a random start image and CLIP output,
    the tiny audio patch and a stub VAE (the node encodes the start image with it)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                             "audio_scale": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0}),
                             "seed": ("INT", {"default": 0}), "width": ("INT", {"default": 72}),
                             "height": ("INT", {"default": 48}), "length": ("INT", {"default": 9}),
                             "speakers": ("INT", {"default": 1})}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "LATENT")
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, model, positive, negative, audio_scale, seed, width, height, length, speakers):
        from comfy_extras.nodes_wan import WanInfiniteTalkToVideo

        g = torch.Generator().manual_seed(seed)
        audio = {"encoded_audio_all_layers": [torch.randn(1, 2 * length + 4, 768, generator=g) for _ in range(13)]}
        mode = {"mode": "single_speaker"}
        if speakers == 2:  # the second voice, the left and the right half of the picture
            left = torch.zeros(1, height, width)
            left[:, :, : width // 2] = 1.0
            mode = {"mode": "two_speakers", "mask_1": left, "mask_2": 1.0 - left, "audio_encoder_output_2": {
                "encoded_audio_all_layers": [torch.randn(1, 2 * length + 4, 768, generator=g) for _ in range(13)]}}
        image = torch.rand(1, height, width, 3, generator=g)
        clip = _ClipVisionOutput(torch.randn(1, 257, 1280, generator=g))  # native Wan I2V wants CLIP tokens
        dim = model.model.diffusion_model.dim
        out = WanInfiniteTalkToVideo.execute(mode, model, _talk_patch(dim), positive, negative,
                                             _StubVae(), width, height, length, audio, 9, start_image=image,
                                             audio_scale=audio_scale, clip_vision_output=clip)
        return tuple(out.args[:4])


CAPTURED = H.CAPTURED


NODES.NODE_CLASS_MAPPINGS.update({"XDitTestRandomConditioning": H.RandomConditioning,
                                  "XDitTestImageToVideoConds": XDitTestImageToVideoConds,
                                  "XDitTestCaptureLatent": H.CaptureLatent,
                                  "XDitTestFirstLastFrameConds": XDitTestFirstLastFrameConds,
                                  "XDitTestVaceConds": XDitTestVaceConds,
                                  "XDitTestTI2VLatent": XDitTestTI2VLatent,
                                  "XDitTestInstallPatch": XDitTestInstallPatch,
                                  "XDitTestInfiniteTalk": XDitTestInfiniteTalk})


# ------------------------------------------------------------------------------------- fixtures
def _tiny_model(variant, seed, heads=2):
    tiny = importlib.import_module(PACK.__name__ + ".parallel.tiny")
    cfg = tiny.tiny_config(variant, heads=heads)
    if variant in ("i2v", "flf2v"):
        cfg["image_dim"] = 1280  # ComfyUI's WanModel fixes the CLIP feature size at 1280
    if variant == "flf2v":
        cfg["pos_embed_seq_len"] = 2 * 257
    if variant == "vace":
        cfg["vace_in_channels"] = 96  # ComfyUI sends 32 latent + 64 mask channels
    model = tiny.model_class(variant)(**cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def _save_original(model, path):
    mapping = importlib.import_module(PACK.__name__ + ".wan_to_xdit_mapping")
    sd = mapping.to_original(model.state_dict())
    # ComfyUI's detection assumes text_dim 4096; the file's metadata tells it otherwise (as for native)
    save_file({k: v.contiguous() for k, v in sd.items()}, path,
              metadata={"config": json.dumps({"transformer": {"text_dim": TEXT_DIM}})})


def _save_lora(path, seed=5, rank=4):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for b in (0, 1):
        for m, (o, i) in {"self_attn.q": (256, 256), "self_attn.v": (256, 256), "cross_attn.k": (256, 256),
                          "ffn.0": (512, 256)}.items():
            base = f"diffusion_model.blocks.{b}.{m}"
            t[base + ".lora_up.weight"] = torch.randn(o, rank, generator=g) * 0.3
            t[base + ".lora_down.weight"] = torch.randn(rank, i, generator=g) * 0.1
            t[base + ".alpha"] = torch.tensor(float(rank) / 2)
    t["diffusion_model.blocks.1.ffn.2.diff"] = torch.randn(256, 512, generator=g) * 0.01
    t["diffusion_model.blocks.0.self_attn.o.diff_b"] = torch.randn(256, generator=g) * 0.05
    save_file(t, path)


def _save_set_lora(path, seed=8):
    """A "LoRA" that replaces one weight (set_weight: ComfyUI's "set" patch) and adds a diff to another."""
    g = torch.Generator().manual_seed(seed)
    save_file({"diffusion_model.blocks.1.ffn.0.set_weight": torch.randn(512, 256, generator=g) * 0.05,
               "diffusion_model.blocks.0.cross_attn.o.diff": torch.randn(256, 256, generator=g) * 0.05}, path)


def _save_lycoris(path, seed=9, rank=4):
    """LyCORIS formats ComfyUI reads: LoHa (hada_*) on one weight, LoKr (lokr_w1 x lokr_w2) on another."""
    g = torch.Generator().manual_seed(seed)
    k, f = "diffusion_model.blocks.0.self_attn.k", "diffusion_model.blocks.1.ffn.0"
    save_file({f"{k}.hada_w1_a": torch.randn(256, rank, generator=g) * 0.3,
               f"{k}.hada_w1_b": torch.randn(rank, 256, generator=g) * 0.3,
               f"{k}.hada_w2_a": torch.randn(256, rank, generator=g) * 0.3,
               f"{k}.hada_w2_b": torch.randn(rank, 256, generator=g) * 0.3,
               f"{k}.alpha": torch.tensor(2.0),
               f"{f}.lokr_w1": torch.randn(2, 2, generator=g),
               f"{f}.lokr_w2": torch.randn(256, 128, generator=g) * 0.02}, path)


@pytest.fixture(scope="module")
def models_dir():
    d = tempfile.mkdtemp(prefix="xdit_usp_models_")
    dm, lo = os.path.join(d, "diffusion_models"), os.path.join(d, "loras")
    os.makedirs(dm)
    os.makedirs(lo)
    _save_original(_tiny_model("t2v", 0), os.path.join(dm, "tiny_t2v.safetensors"))
    _save_original(_tiny_model("t2v", 1), os.path.join(dm, "tiny_t2v_low.safetensors"))
    _save_original(_tiny_model("i2v", 2), os.path.join(dm, "tiny_i2v.safetensors"))
    _save_original(_tiny_model("flf2v", 3), os.path.join(dm, "tiny_flf2v.safetensors"))
    _save_original(_tiny_model("vace", 4), os.path.join(dm, "tiny_vace.safetensors"))
    _save_original(_tiny_model("ti2v_5b", 5), os.path.join(dm, "tiny_ti2v_5b.safetensors"))
    # InfiniteTalk's audio attention has 40 heads (WanMultiTalkAttentionBlock): the width must divide by 40
    _save_original(_tiny_model("i2v", 12, heads=5), os.path.join(dm, "tiny_i2v_talk.safetensors"))
    sharp = _tiny_model("t2v", 6)
    with torch.no_grad():  # q/k RMSNorm gains of ~4 instead of ~0.02: attention logits of order 10, so
        for block in sharp.blocks:  # positions (RoPE) visibly matter
            block.attn1.norm_q.weight.mul_(200)
            block.attn1.norm_k.weight.mul_(200)
    _save_original(sharp, os.path.join(dm, "tiny_t2v_sharp.safetensors"))
    _save_lora(os.path.join(lo, "tiny_lora.safetensors"))
    _save_set_lora(os.path.join(lo, "tiny_set_lora.safetensors"))
    _save_lycoris(os.path.join(lo, "tiny_lycoris.safetensors"))
    folder_paths.add_model_folder_path("diffusion_models", dm)
    folder_paths.add_model_folder_path("loras", lo)
    yield d
    PAR.close_all_groups()
    mm.unload_all_models()
    for folder, path in (("diffusion_models", dm), ("loras", lo)):  # later tests must not list a deleted folder
        folder_paths.folder_names_and_paths[folder][0].remove(path)
    folder_paths.filename_list_cache.clear()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def runner(models_dir):
    return H.Runner()


# --------------------------------------------------------------------------------------- graphs
def _cfg_node(**over):
    inputs = dict(gpus=2, ulysses_degree=0, ring_degree=0, cfg_degree=0, dtype="fp32", attention_backend="auto",
                  gpu_memory_fraction=1.0, device="cpu")
    inputs.update(over)
    return {"class_type": "XDitUSPConfigNode", "inputs": inputs}


def _loader(ours: bool, name: str, cfg_id="cfg"):
    if ours:
        return {"class_type": "XDitUSPWanVideoModelLoader",
                "inputs": {"unet_name": name, "weight_dtype": "default", "xdit_usp_config": [cfg_id, 0]}}
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}


def t2v_graph(ours: bool, unet="tiny_t2v.safetensors", lora=None, cfg_over=None, i2v=False, shift=8.0, steps=3,
              seed=7):
    p = {
        "model": _loader(ours, unet),
        "ms": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["model", 0], "shift": shift}},
        "pos": {"class_type": "XDitTestRandomConditioning", "inputs": {"seed": 1, "tokens": 16, "dim": TEXT_DIM}},
        "neg": {"class_type": "XDitTestRandomConditioning", "inputs": {"seed": 2, "tokens": 16, "dim": TEXT_DIM}},
        "latent": {"class_type": "EmptyHunyuanLatentVideo", "inputs": dict(SAMPLE, batch_size=1)},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["ms", 0], "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
    }
    if ours:
        p["cfg"] = _cfg_node(**(cfg_over or {}))
    if lora is not None:
        p["lora"] = {"class_type": "LoraLoaderModelOnly",
                     "inputs": {"model": ["model", 0], "lora_name": "tiny_lora.safetensors", "strength_model": lora}}
        p["ms"]["inputs"]["model"] = ["lora", 0]
    if i2v:
        extra = {"flf2v": ("XDitTestFirstLastFrameConds", {}), "vace": ("XDitTestVaceConds", {"strength": 0.7})}
        cls, more = extra.get(i2v, ("XDitTestImageToVideoConds", {}))
        p["i2v"] = {"class_type": cls, "inputs": dict(
            {"positive": ["pos", 0], "negative": ["neg", 0], "latent": ["latent", 0], "seed": 3}, **more)}
        p["ks"]["inputs"]["positive"] = ["i2v", 0]
        p["ks"]["inputs"]["negative"] = ["i2v", 1]
        if i2v == "vace":  # native VACE does not pad the control video: use a latent the patch divides
            p["latent"]["inputs"]["width"] = 64
    if unet.startswith("tiny_ti2v"):
        p["latent"] = {"class_type": "XDitTestTI2VLatent", "inputs": {"seed": 4, "frames": 3, "height": 4, "width": 6}}
    return p


def two_expert_graph(ours: bool, low_dtype="default", seed=11):
    p = {
        "high": _loader(ours, "tiny_t2v.safetensors"),
        "low": _loader(ours, "tiny_t2v_low.safetensors"),
        "ms_h": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["high", 0], "shift": 8.0}},
        "ms_l": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["low", 0], "shift": 8.0}},
        "pos": {"class_type": "XDitTestRandomConditioning", "inputs": {"seed": 1, "tokens": 16, "dim": TEXT_DIM}},
        "neg": {"class_type": "XDitTestRandomConditioning", "inputs": {"seed": 2, "tokens": 16, "dim": TEXT_DIM}},
        "latent": {"class_type": "EmptyHunyuanLatentVideo", "inputs": dict(SAMPLE, batch_size=1)},
    }
    common = {"cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "positive": ["pos", 0],
              "negative": ["neg", 0], "steps": 4, "noise_seed": seed}
    p["ks1"] = {"class_type": "KSamplerAdvanced", "inputs": dict(
        common, model=["ms_h", 0], add_noise="enable", latent_image=["latent", 0], start_at_step=0, end_at_step=2,
        return_with_leftover_noise="enable")}
    p["ks2"] = {"class_type": "KSamplerAdvanced", "inputs": dict(
        common, model=["ms_l", 0], add_noise="disable", latent_image=["ks1", 0], start_at_step=2, end_at_step=4,
        return_with_leftover_noise="disable")}
    if ours:
        p["cfg"] = _cfg_node()
        p["low"]["inputs"]["weight_dtype"] = low_dtype
    return p


def _latent(runner, prompt, node="ks"):
    prompt = dict(prompt, out={"class_type": "XDitTestCaptureLatent", "inputs": {"samples": [node, 0], "key": "out"}})
    CAPTURED.clear()
    runner.run(prompt, ["out"])
    return CAPTURED["out"].float()


_rel = importlib.import_module(PACK.__name__ + ".parallel.tiny").rel_err


def _group_config(**over):
    return PAR.XDitUSPConfig(**{**dict(world_size=2, dtype="fp32", device="cpu"), **over})


def _group(**over):
    return PAR.get_group(_group_config(**over))


RESULTS = {}


# ---------------------------------------------------------------------------------------- tests
def test_t2v_matches_native(runner):
    native = _latent(runner, t2v_graph(False))
    ours = _latent(runner, t2v_graph(True))
    assert ours.shape == native.shape == (1, 16, 2, 6, 9)
    err = _rel(ours, native)
    RESULTS["t2v cfg-split"] = err
    print(f"\nT2V (cfg2 x ulysses1) max rel err vs native: {err:.3g}")
    assert err < TOL
    g = _group()
    assert g.alive and g.launches == 1
    assert str(g.models[next(iter(g.models))].layout) == "cfg2xulysses1xring1"


def test_t2v_sequence_parallel_matches_native(runner):
    native = _latent(runner, t2v_graph(False))
    ours = _latent(runner, t2v_graph(True, cfg_over={"cfg_degree": 1}))
    err = _rel(ours, native)
    RESULTS["t2v ulysses2"] = err
    print(f"\nT2V (cfg1 x ulysses2, padded sequence) max rel err vs native: {err:.3g}")
    assert err < TOL
    g = _group(cfg_degree=1)
    assert str(g.models[next(iter(g.models))].layout) == "cfg1xulysses2xring1"
    g.close()  # one group at a time on 2 CPU cores


def test_lora_matches_native_and_strength_change_does_not_reload(runner):
    base = _latent(runner, t2v_graph(True))
    native = _latent(runner, t2v_graph(False, lora=1.0))
    g = _group()
    launches = g.launches
    remote = next(r for r in XM.remote_models() if r.key.endswith("tiny_t2v.safetensors")
                  and r.config.cfg_degree == 0)
    sends, loads = remote.stats.patch_sends, remote.stats.loads
    ours = _latent(runner, t2v_graph(True, lora=1.0))
    err = _rel(ours, native)
    RESULTS["lora"] = err
    print(f"\nLoRA max rel err vs native: {err:.3g}; LoRA effect {_rel(ours, base):.3g}")
    assert _rel(ours, base) > 1e-2, "the LoRA should change the output noticeably"
    assert err < TOL
    assert remote.stats.patch_sends == sends + 1
    # a strength change sends new factors only: same group, no new load
    native_half = _latent(runner, t2v_graph(False, lora=0.5))
    ours_half = _latent(runner, t2v_graph(True, lora=0.5))
    assert _rel(ours_half, native_half) < TOL
    assert remote.stats.patch_sends == sends + 2 and g.launches == launches
    assert remote.stats.loads == loads, "a LoRA or strength change must not reload the base weights"
    # same strength again: nothing sent; removing the LoRA restores the base weights on the workers
    _latent(runner, t2v_graph(True, lora=0.5, steps=2))
    assert remote.stats.patch_sends == sends + 2
    again = _latent(runner, t2v_graph(True))
    assert _rel(again, base) < 1e-6 and remote.stats.patch_sends == sends + 3


def test_sharded_weights_with_a_lora_match_native(runner):
    """weight_sharding fsdp on the Config node: each rank holds half the weights, a LoRA merges into
    the shards, and a strength change still needs no reload."""
    for strength in (1.0, 0.5):
        native = _latent(runner, t2v_graph(False, lora=strength))
        ours = _latent(runner, t2v_graph(True, lora=strength, cfg_over={"weight_sharding": "fsdp"}))
        err = _rel(ours, native)
        RESULTS[f"fsdp lora {strength}"] = err
        assert err < TOL
    g = _group(weight_sharding="fsdp")
    loaded = g.models[next(iter(g.models))]
    assert loaded.placement == "fsdp" and loaded.param_bytes <= 0.6 * loaded.param_bytes_total
    assert g.launches == 1
    g.close()  # one group at a time on 2 CPU cores


def test_i2v_matches_native(runner):
    native = _latent(runner, t2v_graph(False, unet="tiny_i2v.safetensors", i2v=True))
    ours = _latent(runner, t2v_graph(True, unet="tiny_i2v.safetensors", i2v=True))
    err = _rel(ours, native)
    RESULTS["i2v"] = err
    print(f"\nI2V (concat latent + mask + CLIP features) max rel err vs native: {err:.3g}")
    assert err < TOL
    info = _group().models[os.path.join(folder_paths.get_folder_paths("diffusion_models")[-1], "tiny_i2v.safetensors")]
    assert info.variant == "i2v" and info.in_channels == 36


@pytest.mark.parametrize("kind", ["flf2v", "vace", "ti2v_5b"])
def test_other_variants_match_native(runner, kind):
    unet = f"tiny_{kind}.safetensors"
    conds = None if kind == "ti2v_5b" else kind
    native = _latent(runner, t2v_graph(False, unet=unet, i2v=conds))
    ours = _latent(runner, t2v_graph(True, unet=unet, i2v=conds))
    err = _rel(ours, native)
    RESULTS[kind] = err
    print(f"\n{kind} max rel err vs native: {err:.3g}")
    assert err < TOL
    if kind == "ti2v_5b":  # the kept first frame came back untouched (per-frame timestep 0)
        assert ours.shape[1] == 48


def test_sampler_custom_advanced(runner):
    def graph(ours):
        p = t2v_graph(ours)
        del p["ks"]
        p.update({
            "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
            "guider": {"class_type": "CFGGuider", "inputs": {"model": ["ms", 0], "positive": ["pos", 0],
                                                             "negative": ["neg", 0], "cfg": 4.5}},
            "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "uni_pc"}},
            "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["ms", 0], "scheduler": "simple",
                                                                  "steps": 3, "denoise": 1.0}},
            "ks": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
                "latent_image": ["latent", 0]}},
        })
        return p

    native = _latent(runner, graph(False))
    ours = _latent(runner, graph(True))
    err = _rel(ours, native)
    RESULTS["SamplerCustomAdvanced"] = err
    assert err < TOL
    remote = next(r for r in XM.remote_models() if r.key.endswith("tiny_t2v.safetensors") and r.config.cfg_degree == 0)
    assert remote.stats.last_batch == 2, "ComfyUI should batch cond and uncond into one forward (our memory_required is small)"


def test_two_experts_share_one_group(runner):
    native = _latent(runner, two_expert_graph(False), "ks2")
    g = _group()
    launches = g.launches
    ours = _latent(runner, two_expert_graph(True), "ks2")
    err = _rel(ours, native)
    RESULTS["two experts"] = err
    print(f"\nWan 2.2-style two experts max rel err vs native: {err:.3g}")
    assert err < TOL
    assert g.launches == launches
    names = {os.path.basename(k) for k in g.models}
    assert {"tiny_t2v.safetensors", "tiny_t2v_low.safetensors"} <= names


def _running_groups():
    return [g for g in LAUNCHER.registered_groups() if g.alive]


@pytest.mark.parametrize("free", ["unload_all_models", "free_memory"])
def test_unload_closes_the_idle_group_and_next_run_relaunches(runner, free):
    seed = 21 if free == "unload_all_models" else 23
    _latent(runner, t2v_graph(True, seed=seed))
    g = _group()
    key = next(k for k in g.models if k.endswith("tiny_t2v.safetensors"))
    remote = next(r for r in XM.remote_models() if r.key == key and r.config.cfg_degree == 0)
    loads = remote.stats.loads
    procs = len(H.worker_processes())
    assert procs >= 3  # torchrun's agent, 2 ranks (and what the ranks started)
    gc.collect()  # models of earlier prompts (i2v, the second expert) are now garbage: reaped below
    if free == "unload_all_models":
        mm.unload_all_models()  # what POST /free {"unload_models": true} does
    else:  # ComfyUI's memory-pressure path: a load that needs more than is free
        cpu = torch.device("cpu")
        mm.free_memory(mm.get_total_memory(cpu) * 2, cpu)
    assert g.models == {} and not g.alive and LAUNCHER.registered_groups() == []
    assert H.wait_worker_processes(0) == []
    again = _latent(runner, t2v_graph(True, seed=seed + 1))  # (a new seed: ComfyUI would reuse a cached result)
    g = _group()
    assert key in g.models and remote.stats.loads == loads + 1 and g.launches == 1  # a new group
    assert len(H.worker_processes()) == procs
    assert _rel(again, _latent(runner, t2v_graph(False, seed=seed + 1))) < TOL


def test_config_change_replaces_the_group_and_keeps_the_process_count(runner):
    """fp32 -> bf16 -> fp32 on the same (CPU) devices: each new config closes the previous group
    before it starts, so one group runs throughout and the real process count stays flat."""
    counts, groups = [], []
    outs = {}
    for i, dtype in enumerate(["fp32", "bf16", "fp32"]):
        outs[i] = _latent(runner, t2v_graph(True, cfg_over={"dtype": dtype}, steps=2, seed=31 + i))
        running = _running_groups()
        assert [g.config.dtype for g in running] == [dtype]
        groups.append(running[0])
        counts.append(H.worker_processes())
    assert len(counts[0]) >= 3 and [len(c) for c in counts] == [len(counts[0])] * 3
    assert not set(counts[0]) & set(counts[1]) and not set(counts[1]) & set(counts[2])  # replaced, not added
    assert groups[1].launches == 1 and not groups[0].alive
    err = _rel(outs[1], _latent(runner, t2v_graph(False, steps=2, seed=32)))
    print(f"\nbf16 group vs native fp32: max rel err {err:.3g}")
    assert err < 5e-2  # the bf16 group computes in bf16


def test_old_model_reloads_on_use_after_its_group_was_replaced(runner):
    """Two experts on the same GPUs with different weight dtypes are two configs, so two groups that
    cannot both run: using the expert whose group was closed starts its group and loads it again (a
    warning says so). Old MODELs keep working, one group runs at a time, results match native."""
    def remote(dtype, name):
        return next(r for r in XM.remote_models() if os.path.basename(r.key) == name
                    and r.config.cfg_degree == 0 and r.config.dtype == dtype and r.config.world_size == 2)

    _latent(runner, two_expert_graph(True, low_dtype="bf16"), "ks2")
    assert [g.config.dtype for g in _running_groups()] == ["bf16"]
    procs = len(H.worker_processes())
    high, low = remote("fp32", "tiny_t2v.safetensors"), remote("bf16", "tiny_t2v_low.safetensors")
    loads = high.stats.loads, low.stats.loads
    # a new seed: both loaders' MODELs come from ComfyUI's cache, built on groups closed since
    ours = _latent(runner, two_expert_graph(True, low_dtype="bf16", seed=12), "ks2")
    assert (high.stats.loads, low.stats.loads) == (loads[0] + 1, loads[1] + 1)
    assert [g.config.dtype for g in _running_groups()] == ["bf16"] and len(H.worker_processes()) == procs
    err = _rel(ours, _latent(runner, two_expert_graph(False, seed=12), "ks2"))
    print(f"\ntwo experts, low in bf16, vs native fp32: max rel err {err:.3g}")
    assert err < 5e-2  # the low expert computes in bf16


def test_weight_hook_fails_loudly(runner):
    """A LoRA hook on the conditioning (CreateHookLora -> Cond Set Props) would patch this process's
    meta weights, i.e. do nothing: the sampler fails with an error that says what to use instead,
    and the model keeps working without the hook."""
    p = t2v_graph(True, steps=2, seed=41)
    p["hook"] = {"class_type": "CreateHookLora",
                 "inputs": {"lora_name": "tiny_lora.safetensors", "strength_model": 1.0, "strength_clip": 1.0}}
    p["hooked"] = {"class_type": "ConditioningSetProperties",
                   "inputs": {"cond_NEW": ["pos", 0], "strength": 1.0, "set_cond_area": "default", "hooks": ["hook", 0]}}
    p["ks"]["inputs"]["positive"] = ["hooked", 0]
    with pytest.raises(H.ExecutionFailed) as ei:
        _latent(runner, p)
    assert ei.value.data.get("node_type") == "KSampler", ei.value
    assert "weight hooks" in ei.value.message and "LoraLoaderModelOnly" in ei.value.message, ei.value
    out = _latent(runner, t2v_graph(True, steps=2, seed=41))
    assert _rel(out, _latent(runner, t2v_graph(False, steps=2, seed=41))) < TOL


def test_failed_load_leaves_no_group(runner, monkeypatch):
    """Every rank raises while loading (the group stays healthy, which used to leave it running
    with nothing loaded): the loader node fails and no group or process is left."""
    monkeypatch.setenv("XDIT_USP_FAULT", "load_raise@0,load_raise@1")
    p = t2v_graph(True, cfg_over={"gpu_memory_fraction": 0.5}, steps=2)  # a config no cached output has
    with pytest.raises(H.ExecutionFailed) as ei:
        _latent(runner, p)
    assert ei.value.data.get("node_type") == "XDitUSPWanVideoModelLoader", ei.value
    assert "injected fault load_raise" in ei.value.message, ei.value
    assert _running_groups() == [] and LAUNCHER.find_group(_group_config(gpu_memory_fraction=0.5)) is None
    assert H.wait_worker_processes(0) == []
    monkeypatch.delenv("XDIT_USP_FAULT")
    out = _latent(runner, p)  # the same graph runs once the fault is gone
    assert torch.isfinite(out).all() and len(_running_groups()) == 1 and len(H.worker_processes()) >= 3


def test_real_server_config_change_and_free_keep_at_most_one_group(models_dir, tmp_path):
    """What a user does with `main.py --cpu` and a browser: queue the graph with Config fp32, then
    bf16 (over HTTP), then press "Unload models" (POST /free). After each prompt one group of
    worker processes runs, a new one; after /free none does."""
    import inspect

    base = tmp_path / "comfyui"
    nodes_dir, models = base / "custom_nodes", base / "models" / "diffusion_models"
    nodes_dir.mkdir(parents=True)
    models.mkdir(parents=True)
    os.symlink(W.ROOT, nodes_dir / "comfyui-xdit-usp")  # how a user installs the pack
    (nodes_dir / "xdit_usp_test_nodes.py").write_text(  # the text-embedding stand-in, as a custom node
        inspect.getsource(H.RandomConditioning)
        + "\nNODE_CLASS_MAPPINGS = {'XDitTestRandomConditioning': RandomConditioning}\n")
    os.symlink(os.path.join(models_dir, "diffusion_models", "tiny_t2v.safetensors"), models / "tiny_t2v.safetensors")

    def graph(dtype):
        p = t2v_graph(True, cfg_over={"dtype": dtype}, steps=2)
        p["out"] = {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0], "filename_prefix": "xdit"}}
        return p

    with H.Server(str(base)) as server:
        counts = []
        for dtype in ("fp32", "bf16"):
            server.run(graph(dtype))
            counts.append(H.worker_processes(server.pid))
        assert len(counts[0]) >= 3 and len(counts[1]) == len(counts[0]), (counts, server.log_tail())
        assert not set(counts[0]) & set(counts[1])  # replaced, not added
        server.free(unload_models=True)
        assert H.wait_worker_processes(0, server.pid) == [], server.log_tail()
        saved = [f for f in os.listdir(base / "output") if f.endswith(".latent")]
        assert len(saved) == 2, saved  # SaveLatent wrote one file per prompt: they really ran
    assert H.wait_worker_processes(0, server.pid) == []


def test_dead_worker_is_a_comfyui_error_naming_the_rank_and_next_run_relaunches(runner):
    g = _group()
    g.close()
    g.env["XDIT_USP_FAULT"] = "forward_exit@1"
    try:
        with pytest.raises(H.ExecutionFailed) as ei:
            _latent(runner, t2v_graph(True, steps=2))
    finally:
        g.env.pop("XDIT_USP_FAULT", None)
    assert "rank 1" in ei.value.message and "WorkerError" in ei.value.type, ei.value
    assert not g.alive
    launches = g.launches
    out = _latent(runner, t2v_graph(True, steps=2))  # the cached loader output reloads on the new group
    assert torch.isfinite(out).all() and g.alive and g.launches == launches + 1


# Model-patching nodes the workers honour, each inserted between ModelSamplingSD3 and KSampler.
# ScaleROPE runs on a model whose attention logits make positions matter (tiny_t2v_sharp).
@pytest.mark.parametrize("node,inputs,unet", [
    ("SkipLayerGuidanceDiT", dict(double_layers="1", single_layers="7, 8, 9", scale=3.0, start_percent=0.0,
                                  end_percent=1.0, rescaling_scale=0.0), "tiny_t2v.safetensors"),
    ("SkipLayerGuidanceDiTSimple", dict(double_layers="1", single_layers="7, 8, 9", start_percent=0.0,
                                        end_percent=1.0), "tiny_t2v.safetensors"),
    ("ScaleROPE", dict(scale_x=1.5, shift_x=2.0, scale_y=0.5, shift_y=-1.0, scale_t=2.0, shift_t=0.5),
     "tiny_t2v_sharp.safetensors"),
])
def test_model_patching_nodes_match_native(runner, node, inputs, unet):
    """ComfyUI's own SLG nodes: their block skip (a ("double_block", i) replacement that returns its
    input) runs on the workers as a skipped block, for the calls that carry it; "single_block"
    entries are ignored, as native Wan ignores them. ScaleROPE (transformer_options["rope_options"]):
    the workers build the RoPE tables at the scaled and shifted positions, as native Wan does."""
    def graph(ours):
        p = t2v_graph(ours, unet=unet, seed=41)
        p["patch"] = {"class_type": node, "inputs": dict(inputs, model=["ms", 0])}
        p["ks"]["inputs"]["model"] = ["patch", 0]
        return p

    native, ours = _latent(runner, graph(False)), _latent(runner, graph(True))
    plain = _latent(runner, t2v_graph(False, unet=unet, seed=41))
    print(f"{node} changes native by {_rel(native, plain):.2e}; ours vs native {_rel(ours, native):.2e}")
    assert _rel(native, plain) > 1e-3, "the node changes the native result"
    assert _rel(ours, native) < TOL, _rel(ours, native)


class XDitTestRandomImage:
    """A random IMAGE [frames, height, width, 3] in [0, 1] (a render video for Uni3C)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "frames": ("INT", {"default": 3, "min": 1, "max": 64}),
                             "height": ("INT", {"default": 40, "min": 8, "max": 512}),
                             "width": ("INT", {"default": 64, "min": 8, "max": 512})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, frames, height, width):
        return (torch.rand(frames, height, width, 3, generator=torch.Generator().manual_seed(seed)),)


NODES.NODE_CLASS_MAPPINGS["XDitTestRandomImage"] = XDitTestRandomImage


def _save_uni3c(path, model_dim=256, seed=12, dim=192, conv_out=96, ffn=64, layers=2, add=7, mid=16):
    """A tiny random Uni3C control net under the original checkpoint's names (self_attn.to_q ...,
    converted by ModelPatchLoader), 16 heads of 12, mask embedding included (the loader builds it)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    t = {"controlnet_patch_embedding.weight": r(conv_out, 36, 1, 2, 2), "controlnet_patch_embedding.bias": r(conv_out),
         "proj_in.weight": r(dim, conv_out), "proj_in.bias": r(dim),
         "controlnet_mask_embedding.mask_proj.0.weight": r(mid, add, 4, 8, 8), "controlnet_mask_embedding.mask_proj.0.bias": r(mid),
         "controlnet_mask_embedding.mask_proj.1.weight": 1 + r(mid), "controlnet_mask_embedding.mask_proj.1.bias": r(mid),
         "controlnet_mask_embedding.mask_zero_proj.weight": r(conv_out, mid, 1, 2, 2),
         "controlnet_mask_embedding.mask_zero_proj.bias": r(conv_out)}
    for i in range(layers):
        b = f"controlnet_blocks.{i}."
        for n in ("norm1", "norm2"):
            t.update({b + n + ".linear.weight": r(3 * dim, model_dim), b + n + ".linear.bias": r(3 * dim),
                      b + n + ".norm.weight": 1 + r(dim), b + n + ".norm.bias": r(dim)})
        for n in ("to_q", "to_k", "to_v", "to_out.0"):
            t.update({b + f"self_attn.{n}.weight": r(dim, dim), b + f"self_attn.{n}.bias": r(dim)})
        t.update({b + "self_attn.norm_q.weight": 1 + r(dim), b + "self_attn.norm_k.weight": 1 + r(dim),
                  b + "ffn.0.weight": r(ffn, dim), b + "ffn.0.bias": r(ffn), b + "ffn.2.weight": r(dim, ffn),
                  b + "ffn.2.bias": r(dim), f"proj_out.{i}.weight": r(model_dim, dim), f"proj_out.{i}.bias": r(model_dim)})
    save_file({k: v.contiguous() for k, v in t.items()}, path)


@pytest.fixture(scope="module")
def uni3c_files(models_dir):
    """model_patches/tiny_uni3c.safetensors and vae/tiny_wan21_vae.safetensors (the tiny Wan 2.1 VAE)."""
    tiny = importlib.import_module(PACK.__name__ + ".parallel.tiny")
    mp, vae = os.path.join(models_dir, "model_patches"), os.path.join(models_dir, "vae")
    os.makedirs(mp, exist_ok=True)
    os.makedirs(vae, exist_ok=True)
    _save_uni3c(os.path.join(mp, "tiny_uni3c.safetensors"))
    state = tiny.vae_comfy_state_dict(tiny.build_vae("2.1", seed=4), "2.1")
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(vae, "tiny_uni3c_vae.safetensors"))
    folder_paths.add_model_folder_path("model_patches", mp)
    folder_paths.add_model_folder_path("vae", vae)
    yield
    for folder, path in (("model_patches", mp), ("vae", vae)):
        folder_paths.folder_names_and_paths[folder][0].remove(path)
    folder_paths.filename_list_cache.clear()


def test_uni3c_camera_control_matches_native(runner, uni3c_files):
    """ComfyUI's ModelPatchLoader + WanUni3CControlnetApply (a double_block patch) on our MODEL: the
    control net runs on the workers (CFG split on the 2 ranks: each group computes it for the cond
    rows, as native shares them), the render video is encoded by ComfyUI's VAE in ComfyUI's process,
    the sigma window (end_percent 0.4: sigma 0.92 with shift 8) leaves the second of the 2 steps
    (sigma 0.89) without it. Same latent as native, and the node changes ours as much as it changes
    native (the graphs without it are the merge tests' _PLAIN, computed once)."""
    def graph(ours):
        p = t2v_graph(ours, seed=43, steps=2)
        p.update({
            "mp": {"class_type": "ModelPatchLoader", "inputs": {"name": "tiny_uni3c.safetensors"}},
            "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_uni3c_vae.safetensors"}},
            "render": {"class_type": "XDitTestRandomImage", "inputs": {"seed": 3, "frames": 3, "height": 40,
                                                                        "width": 64}},
            "uni3c": {"class_type": "WanUni3CControlnetApply", "inputs": {
                "model": ["ms", 0], "model_patch": ["mp", 0], "vae": ["vae", 0], "render_video": ["render", 0],
                "strength": 0.8, "start_percent": 0.0, "end_percent": 0.4}},
        })
        p["ks"]["inputs"]["model"] = ["uni3c", 0]
        return p

    def nets_loaded():
        return [lm for lm in mm.current_loaded_models if type(getattr(lm.model, "model", None)).__name__ == "WanUni3CControlnet"]

    ours = _latent(runner, graph(True))
    assert not nets_loaded(), "ComfyUI loaded the control net beside our MODEL (the workers hold it)"
    native = _latent(runner, graph(False))
    assert nets_loaded(), "native loads it (the check above sees it)"
    for o in (False, True):
        if o not in _PLAIN:
            _PLAIN[o] = _latent(runner, t2v_graph(o, seed=43, steps=2))
    effect_native, effect_ours = _rel(native, _PLAIN[False]), _rel(ours, _PLAIN[True])
    err = _rel(ours, native)
    print(f"Uni3C changes native by {effect_native:.3e}, ours by {effect_ours:.3e}; ours vs native {err:.2e}")
    assert effect_native > 1e-3, "the node changes the native result"
    assert err < TOL
    assert abs(effect_ours - effect_native) <= TOL * max(1.0, effect_native)
    assert _group().uni3c is not None  # the control net was sent to (and is held by) the workers


def test_uni3c_refuses_layouts_it_cannot_run_naming_the_node():
    """Before sampling: Uni3C with tensor / pipeline parallel, and with a Ulysses degree that its 16
    control heads do not divide (a Config for a 48-head model on 3 ranks), is refused naming the node
    and saying what works. A real WanUni3CCnetPatch around a real (tiny) ComfyUI Uni3C net."""
    import types

    import comfy.ldm.wan.uni3c
    import comfy.ops
    from comfy_extras.nodes_model_patch import WanUni3CCnetPatch

    net = comfy.ldm.wan.uni3c.WanUni3CControlnet(in_channels=36, conv_out_dim=96, dim=192, ffn_dim=64, num_layers=1,
                                                time_embed_dim=256, out_proj_dim=256, mid_channels=16,
                                                operations=comfy.ops.manual_cast)
    patch = WanUni3CCnetPatch(types.SimpleNamespace(model=net), None, None, None, 1.0, 1.0, 0.0)
    assert XM._is_uni3c(patch) and not XM._is_uni3c(lambda kwargs: kwargs)
    ok = PAR.XDitUSPConfig(world_size=2, ulysses_degree=2, device="cpu")
    assert XM.uni3c_layout_problems(ok, 2, patch) == []
    bad_ulysses = XM.uni3c_layout_problems(PAR.XDitUSPConfig(world_size=3, ulysses_degree=3, device="cpu"), 48, patch)
    assert len(bad_ulysses) == 1 and "16 heads" in bad_ulysses[0] and "[1, 2, 4, 8, 16]" in bad_ulysses[0], bad_ulysses
    tp = XM.uni3c_layout_problems(PAR.XDitUSPConfig(world_size=2, tensor_parallel_degree=2, device="cpu"), 2, patch)
    assert len(tp) == 1 and "tensor_parallel_degree" in tp[0], tp
    topts = {"patches": {"double_block": [patch, lambda kwargs: kwargs]}}
    _, problems = XM.check_transformer_options(topts, 2)
    assert len(problems) == 1 and "'double_block'" in problems[0], problems  # the other patch only
    assert XM.check_transformer_options({"patches": {"double_block": [patch]}}, 2)[1] == []


def _talk_graph(ours: bool, audio_scale: float, speakers=1):
    """WanInfiniteTalkToVideo's MODEL, conds and latent into KSampler at cfg 1 (one forward a step, batch 1:
    native InfiniteTalk's audio attention takes one sample a call). Latent 3 x 6 x 9 (45 tokens, 15 a
    frame, padded to 46): the two ranks' shard edge splits frame 1."""
    p = {
        "model": _loader(ours, "tiny_i2v_talk.safetensors"),
        "ms": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["model", 0], "shift": 8.0}},
        "pos": {"class_type": "XDitTestRandomConditioning", "inputs": {"seed": 1, "tokens": 16, "dim": TEXT_DIM}},
        "neg": {"class_type": "XDitTestRandomConditioning", "inputs": {"seed": 2, "tokens": 16, "dim": TEXT_DIM}},
        "talk": {"class_type": "XDitTestInfiniteTalk", "inputs": {
            "model": ["ms", 0], "positive": ["pos", 0], "negative": ["neg", 0], "audio_scale": audio_scale, "seed": 5,
            "width": 72 if speakers == 1 else 64, "height": 48, "length": 9, "speakers": speakers}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["talk", 0], "seed": 9, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["talk", 1], "negative": ["talk", 2], "latent_image": ["talk", 3], "denoise": 1.0}},
    }
    if ours:
        p["cfg"] = _cfg_node()
    return p


def test_infinite_talk_audio_runs_on_the_workers(runner):
    """WanInfiniteTalkToVideo (single speaker): its attn2_patch (MultiTalkCrossAttnPatch, the per-block
    audio cross-attention) runs on the workers, its weights sent once; the audio projection and the
    motion-frame wrappers stay in ComfyUI. Same latent as native, and audio_scale changes ours as
    much as native (it used to be refused; silently dropped it would change nothing)."""
    native = {s: _latent(runner, _talk_graph(False, s)) for s in (1.0, 0.0)}
    ours = {s: _latent(runner, _talk_graph(True, s)) for s in (1.0, 0.0)}
    d_native, d_ours = _rel(native[1.0], native[0.0]), _rel(ours[1.0], ours[0.0])
    errs = {s: _rel(ours[s], native[s]) for s in ours}
    print(f"InfiniteTalk: audio_scale 1 vs 0 changes native by {d_native:.2e}, ours by {d_ours:.2e}; ours vs native {errs}")
    assert d_native > 1e-3, "the audio changes the native result"
    assert all(e < TOL for e in errs.values()), errs
    assert abs(d_ours - d_native) < 1e-3 * d_native + TOL
    g = _group()
    assert g.audio is not None and g.audio.startswith("audio-")


def test_infinite_talk_two_speakers_match_native(runner):
    """WanInfiniteTalkToVideo mode two_speakers: each block's speaker map (self-attention's q against
    the first frame's k, summed in each mask) is taken on the workers, the reference k gathered from
    the rank holding it (latent 3 x 6 x 8: 12 reference tokens on rank 0, frame 1 split by the shard
    edge), its min and max over the whole sequence; then the audio attention with 1-D RoPE by speaker."""
    native = _latent(runner, _talk_graph(False, 1.0, speakers=2))
    ours = _latent(runner, _talk_graph(True, 1.0, speakers=2))
    err = _rel(ours, native)
    print(f"InfiniteTalk two speakers: ours vs native {err:.2e}")
    assert err < TOL


def test_infinite_talk_patches_the_workers_cannot_take_are_refused():
    """A second audio patch, a speaker map without its audio patch or with other than two masks, a
    foreign attn2_patch, and InfiniteTalk with VACE or tensor/pipeline parallel are refused, naming
    what works."""
    from comfy.ldm.wan.model_multitalk import MultiTalkCrossAttnPatch, MultiTalkGetAttnMapPatch

    cross = MultiTalkCrossAttnPatch(object(), 1.0)
    topts = {"patches": {"attn2_patch": [cross], "attn1_patch": [MultiTalkGetAttnMapPatch(torch.ones(2, 4))]}}
    assert XM.check_transformer_options(topts, 2)[1] == []  # two speakers: honoured
    _, problems = XM.check_transformer_options({"patches": {"attn1_patch": [MultiTalkGetAttnMapPatch(torch.ones(2, 4))]}}, 2)
    assert len(problems) == 1 and "speaker maps" in problems[0], problems
    topts["patches"]["attn1_patch"] = [MultiTalkGetAttnMapPatch(torch.ones(3, 4))]
    _, problems = XM.check_transformer_options(topts, 2)
    assert len(problems) == 1 and "two speakers" in problems[0], problems
    _, problems = XM.check_transformer_options({"patches": {"attn2_patch": [cross]}}, 2)
    assert problems == []
    _, problems = XM.check_transformer_options({"patches": {"attn2_patch": [cross, MultiTalkCrossAttnPatch(object())]}}, 2)
    assert len(problems) == 1 and "2 audio patches" in problems[0], problems
    _, problems = XM.check_transformer_options({"patches": {"attn2_patch": [cross, lambda kw: kw["x"]]}}, 2)
    assert len(problems) == 1 and "'attn2_patch'" in problems[0], problems
    import types
    problems = XM._audio_layout_problems(types.SimpleNamespace(is_vace=True),
                                         _group_config(world_size=2, tensor_parallel_degree=2), "WanInfiniteTalkToVideo")
    assert len(problems) == 2 and "VACE" in problems[0] and "tensor_parallel_degree" in problems[1], problems


def test_torch_compile_model_compiles_on_the_workers(runner):
    """ComfyUI's TorchCompileModel on our MODEL: the proxy (a call to the workers) is not traced, and
    every forward of the sampling runs the workers' compiled blocks; same latent as native."""
    def graph(ours, compiled):
        p = t2v_graph(ours, seed=43)
        if compiled:
            p["compile"] = {"class_type": "TorchCompileModel", "inputs": {"model": ["ms", 0], "backend": "inductor"}}
            p["ks"]["inputs"]["model"] = ["compile", 0]
        return p

    ours_plain = _latent(runner, graph(True, False))
    remote = next(r for r in XM._remotes.values() if r.path.endswith("tiny_t2v.safetensors") and r.config == _group_config())
    before = dataclasses.replace(remote.stats)
    ours = _latent(runner, graph(True, True))
    native = _latent(runner, graph(False, False))
    steps = 3
    assert remote.stats.forwards - before.forwards == steps  # cond + uncond batched: one forward a step
    assert remote.stats.compiled_forwards - before.compiled_forwards == steps
    print(f"TorchCompileModel: ours compiled vs native {_rel(ours, native):.2e}, vs ours eager {_rel(ours, ours_plain):.2e}")
    assert _rel(ours, native) < TOL


def _merge_graph(ours: bool, node: str, inputs: dict, model2="ours", seed=43, steps=2):
    """t2v_graph with `node` (a model-merging or LoRA node) between the loader and ModelSamplingSD3;
    model2 (tiny_t2v_low): "ours" (our loader in our graph), "native" (UNETLoader in both graphs) or
    "lora" (ours, with a LoRA of its own) ; None for a one-model node."""
    p = t2v_graph(ours, seed=seed, steps=steps)
    p["merge"] = {"class_type": node, "inputs": dict(inputs)}
    if model2 is not None:
        p["model2"] = _loader(ours and model2 != "native", "tiny_t2v_low.safetensors")
        p["merge"]["inputs"].update(model1=["model", 0], model2=["model2", 0])
        if model2 == "lora":
            p["lora2"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": ["model2", 0], "lora_name": "tiny_lora.safetensors", "strength_model": 0.8}}
            p["merge"]["inputs"]["model2"] = ["lora2", 0]
    else:
        p["merge"]["inputs"]["model"] = ["model", 0]
    p["ms"]["inputs"]["model"] = ["merge", 0]
    return p


def _wan_merge_ratios():
    r = {k: 1.0 for k in ("patch_embedding.", "time_embedding.", "time_projection.", "text_embedding.", "img_emb.",
                          "head.")}
    r.update({f"blocks.{i}.": 1.0 for i in range(40)})
    r.update({"blocks.0.": 0.2, "blocks.1.": 0.7, "head.": 0.5, "time_embedding.": 0.4})
    return r


_PLAIN = {}


# Nodes that change a Wan MODEL's weights: applied on the workers from the patch data (a merge with
# one of our models reads its file there), compared with the native graph and by their effect.
@pytest.mark.parametrize("node,inputs,model2", [
    ("ModelMergeSimple", dict(ratio=0.4), "ours"),
    ("ModelMergeWAN2_1", _wan_merge_ratios(), "ours"),
    ("ModelMergeSubtract", dict(multiplier=0.5), "ours"),  # strength_model 0.5 on the base weight
    ("ModelMergeAdd", {}, "ours"),
    ("ModelMergeSimple", dict(ratio=0.6), "lora"),  # the second model's own LoRA travels with the merge
    ("ModelMergeSimple", dict(ratio=0.4), "native"),  # a native second model: its weights are sent whole
    ("LoraLoaderModelOnly", dict(lora_name="tiny_set_lora.safetensors", strength_model=0.7), None),  # set + diff
    ("LoraLoaderModelOnly", dict(lora_name="tiny_lora.safetensors", strength_model=-0.6), None),
    ("LoraLoaderModelOnly", dict(lora_name="tiny_lycoris.safetensors", strength_model=0.8), None),  # LoHa + LoKr
], ids=["simple", "wan2_1", "subtract", "add", "model2-lora", "model2-native", "set", "lora-negative", "loha-lokr"])
def test_weight_patching_nodes_match_native(runner, node, inputs, model2):
    for ours in (False, True):
        if ours not in _PLAIN:
            _PLAIN[ours] = _latent(runner, t2v_graph(ours, seed=43, steps=2))
    native, ours = _latent(runner, _merge_graph(False, node, inputs, model2)), _latent(runner, _merge_graph(True, node, inputs, model2))
    effect_native, effect_ours = _rel(native, _PLAIN[False]), _rel(ours, _PLAIN[True])
    err = _rel(ours, native)
    case = f"{node} " + (f"model2 {model2}" if model2 else f"{inputs['lora_name']} {inputs['strength_model']}")
    RESULTS[case] = err
    print(f"\n{case}: changes native by {effect_native:.3e}, ours by {effect_ours:.3e}; ours vs native {err:.2e}")
    assert effect_native > 1e-3, "the node changes the native result"
    assert err < TOL
    assert abs(effect_ours - effect_native) <= TOL * max(1.0, effect_native)
    # the same loader without the node: the workers restore the file's weights, without a reload
    remote = next(r for r in XM.remote_models() if r.key.endswith("tiny_t2v.safetensors")
                  and r.config.cfg_degree == 0 and r.config.world_size == 2 and r.config.weight_sharding == "auto")
    loads, sends = remote.stats.loads, remote.stats.patch_sends
    assert _rel(_latent(runner, t2v_graph(True, seed=43, steps=2)), _PLAIN[True]) < 1e-6
    assert remote.stats.loads == loads and remote.stats.patch_sends == sends + 1


def test_compute_dtype_is_honoured_when_it_is_the_workers_and_refused_before_sampling_otherwise(runner):
    """ModelComputeDtype: the workers' own dtype (here fp32, the test Config's) or "default" changes
    nothing, in native and in ours; another one is refused when the model loads for sampling, naming
    the node, before any forward."""
    def graph(ours, dtype):
        p = t2v_graph(ours, seed=44, steps=2)
        p["dt"] = {"class_type": "ModelComputeDtype", "inputs": {"model": ["model", 0], "dtype": dtype}}
        p["ms"]["inputs"]["model"] = ["dt", 0]
        return p

    plain = {o: _latent(runner, t2v_graph(o, seed=44, steps=2)) for o in (False, True)}
    for dtype in ("fp32", "default"):
        native, ours = _latent(runner, graph(False, dtype)), _latent(runner, graph(True, dtype))
        RESULTS[f"ModelComputeDtype {dtype}"] = _rel(ours, native)
        assert _rel(ours, native) < TOL
        assert _rel(native, plain[False]) == 0.0 and _rel(ours, plain[True]) == 0.0  # no effect in either
    remote = next(r for r in XM.remote_models() if r.key.endswith("tiny_t2v.safetensors")
                  and r.config.cfg_degree == 0 and r.config.world_size == 2 and r.config.weight_sharding == "auto")
    forwards = remote.stats.forwards
    for dtype in ("bf16", "fp16"):
        with pytest.raises(H.ExecutionFailed) as ei:
            _latent(runner, graph(True, dtype))
        assert "ModelComputeDtype (node dt)" in ei.value.message and "XDit+USP Config" in ei.value.message, ei.value
    assert remote.stats.forwards == forwards, "refused before the first step"


# ModelPatcher's set_model_* methods, by where ComfyUI applies what they install
_OWNER_SIDE = {  # run by ComfyUI's sampler in this process, around the model call: honoured as they are
    "set_model_sampler_cfg_function", "set_model_sampler_post_cfg_function", "set_model_sampler_pre_cfg_function",
    "set_model_sampler_calc_cond_batch_function", "set_model_unet_function_wrapper",
    "set_model_denoise_mask_function",
}
_TESTED_ELSEWHERE = {  # honoured on the workers or refused by value: their own tests
    "set_model_rope_options": "test_model_patching_nodes_match_native[ScaleROPE]",
    "set_model_compute_dtype": "test_compute_dtype_is_honoured_when_it_is_the_workers_and_refused_before_sampling_otherwise",
}


def _set_model_methods():
    import comfy.model_patcher

    return sorted(n for n in dir(comfy.model_patcher.ModelPatcher) if n.startswith("set_model_"))


def test_every_patch_a_node_can_put_on_a_wan_model_is_applied_or_refused_naming_the_node(runner):
    """Every transformer patch ModelPatcher can install (each set_model_* method: attn1/attn2 patches
    and replacements, block patches, an unknown patch kind, a block replacement that is not a skip,
    an attention override), every weight patch kind the workers do not apply (comfy.weight_adapter's
    adapters other than LoRA, LoHa and LoKr; patch tuple kinds other than diff and set; offsets,
    functions, padded diffs), object patches inside the transformer, and the real nodes
    LoraLoaderBypassModelOnly (module injections), ModelAttentionBackend and
    PerturbedAttentionGuidance is refused with the name of the node that installed it, before any
    forward on the workers (PAG: at its guidance call); the honoured ones are tested against native
    elsewhere."""
    from comfy.weight_adapter import LoHaAdapter, LoKrAdapter, LoRAAdapter, adapters

    methods = [m for m in _set_model_methods() if m not in _OWNER_SIDE and m not in _TESTED_ELSEWHERE]
    assert {"set_model_attn1_patch", "set_model_attn2_patch", "set_model_attn1_output_patch", "set_model_patch",
            "set_model_patch_replace", "set_model_optimized_attention", "set_model_double_block_patch"} <= set(methods)
    kinds = [f"method:{m}" for m in methods]
    kinds += [f"weight:{a.__name__}" for a in adapters if a not in (LoRAAdapter, LoHaAdapter, LoKrAdapter)]
    kinds += ["weight:model_as_lora", "weight:xdit_unknown", "weight:offset", "weight:function", "weight:pad_weight",
              "object:diffusion_model.blocks.0.forward"]
    _latent(runner, t2v_graph(True, seed=45, steps=1))  # loaded and warm
    remote = next(r for r in XM.remote_models() if r.key.endswith("tiny_t2v.safetensors")
                  and r.config.cfg_degree == 0 and r.config.world_size == 2 and r.config.weight_sharding == "auto")
    forwards, loads = remote.stats.forwards, remote.stats.loads
    unrefused, messages = {}, {}
    for kind in kinds:
        p = t2v_graph(True, seed=45, steps=1)
        p["patch"] = {"class_type": "XDitTestInstallPatch", "inputs": {"model": ["ms", 0], "kind": kind}}
        p["ks"]["inputs"]["model"] = ["patch", 0]
        try:
            _latent(runner, p)
        except H.ExecutionFailed as e:
            messages[kind] = e.message
            if "XDitTestInstallPatch (node patch)" not in e.message:
                unrefused[kind] = e.message
        else:
            unrefused[kind] = "ran"
    assert not unrefused, unrefused
    for kind in ("method:set_model_attn2_patch", "weight:OFTAdapter", "object:diffusion_model.blocks.0.forward"):
        print(f"\n{kind}: {messages[kind]}")
    # real nodes: LoRA in bypass mode (forward hooks on the transformer's modules), an attention backend
    for node, inputs in [("LoraLoaderBypassModelOnly", dict(lora_name="tiny_lora.safetensors", strength_model=1.0)),
                         ("ModelAttentionBackend", dict(attention="pytorch attention"))]:
        p = t2v_graph(True, seed=45, steps=1)
        p["real"] = {"class_type": node, "inputs": dict(inputs, model=["ms", 0])}
        p["ks"]["inputs"]["model"] = ["real", 0]
        with pytest.raises(H.ExecutionFailed) as ei:
            _latent(runner, p)
        assert f"{node} (node real)" in ei.value.message, ei.value
    assert remote.stats.forwards == forwards, "refused before any forward"
    # PerturbedAttentionGuidance adds its attention replacement at sampling time, from its CFG
    # function (after the step's first forward): refused there, named by its code
    p = t2v_graph(True, seed=45, steps=1)
    p["pag"] = {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": ["ms", 0], "scale": 2.0}}
    p["ks"]["inputs"]["model"] = ["pag", 0]
    with pytest.raises(H.ExecutionFailed) as ei:
        _latent(runner, p)
    assert "patches_replace 'attn1' installed by PerturbedAttentionGuidance" in ei.value.message, ei.value
    # and the model is fine afterwards (a refused weight patch made ComfyUI detach it: reloaded once)
    out = _latent(runner, t2v_graph(True, seed=45, steps=1))
    assert _rel(out, _latent(runner, t2v_graph(False, seed=45, steps=1))) < TOL
    print(f"\n{len(kinds)} patch kinds and 3 real nodes refused naming their node; "
          f"model reloads: {remote.stats.loads - loads}")
    assert remote.stats.loads == loads, "a refusal before sampling leaves the model loaded"


def test_every_set_model_method_is_classified():
    """A set_model_* method a new ComfyUI adds fails here until it is classified above (owner-side,
    tested elsewhere, or in the refusal test's list, which runs every other one)."""
    import comfy.model_patcher
    import inspect

    for name in _set_model_methods():
        if name in _OWNER_SIDE or name in _TESTED_ELSEWHERE:
            continue
        params = list(inspect.signature(getattr(comfy.model_patcher.ModelPatcher, name)).parameters)[1:]
        assert params[0] == "patch" or name == "set_model_optimized_attention", (name, params)


def test_memory_manager_on_cpu_unchanged_and_partially_unload_trims_never_detaches(runner):
    native = _latent(runner, t2v_graph(False, seed=31))
    ours = _latent(runner, t2v_graph(True, seed=31))
    patcher = next(lm.model for lm in mm.current_loaded_models if isinstance(lm.model, XM.XDitUSPModelPatcher)
                   and lm.model.remote.path.endswith("tiny_t2v.safetensors"))
    remote, g = patcher.remote, patcher.remote.group
    loads, launches = remote.stats.loads, g.launches
    # CPU workers share no GPU with ComfyUI: the sizes ComfyUI sees are what they were
    assert remote.footprint(patcher.load_device) is None
    assert patcher.model_size() == XM.PROXY_SIZE
    assert patcher.loaded_size() == patcher.model.model_loaded_weight_memory  # ComfyUI's own bookkeeping
    assert patcher.current_loaded_device() == patcher.load_device  # loaded on the workers
    # ComfyUI's partial unload asks the workers to trim and frees nothing on a device ComfyUI uses
    trims = [s.trims for s in g.memory()]
    assert patcher.partially_unload(patcher.offload_device, 1 << 30) == 0
    assert [s.trims for s in g.memory_stats] == [t + 1 for t in trims]
    assert remote.loaded and g.alive
    # ComfyUI's lowvram path: a budget smaller than the model is a full load that moves no weight ...
    patcher.load(patcher.load_device, lowvram_model_memory=1)
    assert not patcher.model.model_lowvram and patcher.model.model_loaded_weight_memory == patcher.model_size()
    assert all(p.is_meta for p in patcher.model.diffusion_model.parameters())
    # ... and a negative one (give memory back) is a trim
    assert patcher.partially_load(patcher.load_device, extra_memory=-(1 << 20)) == 0
    assert [s.trims for s in g.memory_stats] == [t + 2 for t in trims]
    again = _latent(runner, t2v_graph(True, seed=31 + 1))  # samples on, nothing reloaded
    assert remote.stats.loads == loads and g.launches == launches and g.alive
    # and at the end of that sampling (ON_CLEANUP) the ranks gave their cached activations back
    assert [s.trims for s in g.memory()] == [t + 3 for t in trims]
    assert _rel(again, _latent(runner, t2v_graph(False, seed=31 + 1))) < TOL
    assert _rel(ours, native) < TOL
    # a dead group: partially_unload returns 0 (never raises), and the next run relaunches
    os.kill(g.pids[1], signal.SIGKILL)
    assert patcher.partially_unload(patcher.offload_device, 1 << 30) == 0
    assert not g.alive
    out = _latent(runner, t2v_graph(True, seed=31 + 2))
    assert torch.isfinite(out).all() and g.alive and g.launches == launches + 1


def test_a_rank_on_comfyuis_gpu_is_what_comfyui_sees(models_dir):
    """The device matching and the sizes of a CUDA config (no GPU needed: the model is not loaded,
    so nothing asks the workers); the loaded figures are memory.shared_footprint's (test_memory.py)."""
    import dataclasses as dc

    path = os.path.join(models_dir, "diffusion_models", "tiny_t2v.safetensors")
    cpu = XM.RemoteWanModel(_group_config(), path)
    remote = XM.RemoteWanModel(PAR.XDitUSPConfig(world_size=2, device="cuda", device_ids=[2, 0]), path)
    assert remote.footprint(torch.device("cuda", 0)) is None  # no load yet: nothing known
    remote.info = cpu.info = dc.replace(PROTOCOL.Loaded(
        load_s=0.0, backend="x", layout=PAR.Layout(1, 2, 1), fallback_layout=PAR.Layout(1, 2, 1), variant="t2v",
        num_heads=2, in_channels=16, out_channels=16, patch_size=[1, 2, 2], memory_bytes=None),
        param_bytes=700, param_bytes_per_rank=[700, 600], peak_estimate=5000)
    assert remote.shared_rank(torch.device("cuda", 0)) == 1  # device_ids [2, 0]: rank 1 runs on GPU 0
    assert remote.footprint(torch.device("cuda", 0)) == (5000, 0)  # room for the planned peak before its load
    assert remote.shared_rank(torch.device("cuda", 1)) is None and remote.footprint(torch.device("cuda", 1)) is None
    assert remote.footprint(torch.device("cpu")) is None
    assert cpu.footprint(torch.device("cuda", 0)) is None  # CPU ranks share no GPU
    assert remote.trim(torch.device("cuda", 0)) == 0  # no group: nothing to trim, no error


def test_example_workflow_passes_comfyui_validation(runner, tmp_path):
    """With each file the workflow lists for the Missing Models panel (properties.models) saved where
    it says, the prompt the UI sends (its Markdown note left out) passes ComfyUI's validation."""
    wf = W.load_example()
    api = W.ui_to_api(wf, NODES.NODE_CLASS_MAPPINGS)
    assert len(api) == len(wf["nodes"]) - 1 and all(n["class_type"] != "MarkdownNote" for n in api.values())
    listed = [m for n in wf["nodes"] for m in n["properties"].get("models", [])]
    assert {m["directory"]: m["name"] for m in listed} == {
        "diffusion_models": api["2"]["inputs"]["unet_name"], "text_encoders": api["4"]["inputs"]["clip_name"],
        "vae": api["9"]["inputs"]["vae_name"]}
    for m in listed:
        d = tmp_path / m["directory"]
        d.mkdir()
        (d / m["name"]).write_bytes(b"")  # placeholders: validation only checks the names
        folder_paths.add_model_folder_path(m["directory"], str(d))
    valid = runner.validate(api)
    assert valid[0], (valid[1], valid[3])
    assert set(valid[2]) == {"12"}  # SaveVideo is the output


def test_layout_the_heads_cannot_take_fails_at_the_loader_before_launch(runner):
    p = t2v_graph(True, cfg_over={"gpus": 3, "ulysses_degree": 3}, steps=2)
    with pytest.raises(H.ExecutionFailed) as ei:
        _latent(runner, p)
    assert ei.value.type.endswith("ConfigError") and "heads" in ei.value.message, ei.value  # a ValueError
    assert ei.value.data.get("node_type") == "XDitUSPWanVideoModelLoader"
    assert LAUNCHER.find_group(_group_config(world_size=3, ulysses_degree=3)) is None


def test_model_object_contract_and_clear_errors(models_dir):
    import comfy.model_base
    import comfy.model_patcher
    from comfy.weight_adapter import GLoRAAdapter

    (cfg,) = NODES.NODE_CLASS_MAPPINGS["XDitUSPConfigNode"].execute(
        gpus=2, ulysses_degree=0, ring_degree=0, cfg_degree=0, dtype="fp32", attention_backend="auto",
        gpu_memory_fraction=1.0, device="cpu").result
    loader = NODES.NODE_CLASS_MAPPINGS["XDitUSPWanVideoModelLoader"]
    (model,) = loader.execute("tiny_vace.safetensors", "default", cfg).result
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert isinstance(model.model, comfy.model_base.WAN21_Vace)
    dm = model.model.diffusion_model
    sd = model.model.state_dict()
    keys = [k for k in sd if k.startswith("diffusion_model.")]
    assert "diffusion_model.blocks.0.self_attn.q.weight" in keys and "diffusion_model.vace_blocks.0.after_proj.weight" in keys
    assert all(sd[k].is_meta for k in keys)  # no weights in ComfyUI's process
    assert model.model_size() <= 1 << 20
    assert model.model.memory_required([2, 16, 21, 60, 104]) < 256 << 20  # 720p x 81 frames, cond+uncond
    x = torch.zeros(1, 16, 2, 4, 4)
    t = torch.tensor([500.0])
    ctx = torch.zeros(1, 8, TEXT_DIM)
    vace = torch.zeros(1, 1, 96, 2, 4, 4)
    for kw, msg in [(dict(reference_latent=torch.zeros(1, 16, 4, 4)), "reference_latent"),
                    (dict(time_dim_concat=torch.zeros(1, 16, 1, 4, 4)), "time_dim_concat"),
                    (dict(control={"output": []}), "ControlNet"),
                    (dict(vace_context=torch.zeros(1, 2, 96, 2, 4, 4), vace_strength=[1.0, 1.0]), "control inputs"),
                    (dict(transformer_options={"patches": {"attn2_patch": [lambda *a, **k: None]}}),
                     "patches 'attn2_patch'"),
                    (dict(transformer_options={"patches_replace": {"dit": {("double_block", 0): None}}}),
                     "patches_replace 'dit'")]:
        kw.setdefault("vace_context", vace)
        kw.setdefault("vace_strength", [1.0])
        with pytest.raises(ValueError, match=msg):
            dm(x, t, ctx, **kw)
    out = dm(x, t, ctx, vace_context=vace, vace_strength=[1.0])
    assert out.shape == (1, 16, 2, 4, 4)
    # patches the workers cannot apply exactly are errors at load time, never ignored
    key = "diffusion_model.blocks.0.self_attn.q.weight"
    for patch in [{key: ("model_as_lora", (torch.zeros(256, 256),))},
                  {key: GLoRAAdapter(set(), (torch.zeros(256, 2), torch.zeros(2, 256), torch.zeros(256, 2),
                                             torch.zeros(2, 256), None, None))},
                  {(key, (0, 0, 128)): ("diff", (torch.zeros(128, 256),))}]:
        m = model.clone()
        assert m.add_patches(patch, 1.0)
        with pytest.raises(ValueError, match="not supported"):
            mm.load_models_gpu([m])
        assert not m.remote.loaded  # ComfyUI detaches a model whose load failed: unloaded from the workers
    out = dm(x, t, ctx, vace_context=vace, vace_strength=[1.0])  # and the next use loads it again
    assert out.shape == (1, 16, 2, 4, 4) and model.remote.loaded
    assert any(k.endswith("tiny_vace.safetensors") for k in _group().models)
    # once no ComfyUI object refers to the model, the workers drop it at the next safe point
    del model, m, dm, sd
    gc.collect()
    XM.reap_orphans()
    assert not any(k.endswith("tiny_vace.safetensors") for k in _group().models)


@pytest.fixture(scope="module", autouse=True)
def parity_summary(request):
    """After the module: one line with every graph's parity against native (each test asserts its own)."""
    yield
    if RESULTS:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("parity (max |ours - native| / max |native|): "
                                + ", ".join(f"{k}: {v:.2e}" for k, v in RESULTS.items()))


def test_progress_per_step_and_cancel_within_one_step(runner, monkeypatch):
    """ComfyUI's progress bar advances once per step; Cancel (interrupt) stops the run before the
    next forward, and the warm group serves the next prompt without a relaunch."""
    import comfy.utils

    _latent(runner, t2v_graph(True, steps=2))  # warm: loaded
    g = _group()
    launches = g.launches
    remote = next(r for r in XM.remote_models() if r.key.endswith("tiny_t2v.safetensors")
                  and r.config.cfg_degree == 0 and r.config.world_size == 2)
    forwards = remote.stats.forwards
    seen = []

    def hook(value, total, preview=None, node_id=None, **kw):
        seen.append((value, total))
        if value == 2:
            mm.interrupt_current_processing(True)  # what the Cancel button does

    monkeypatch.setattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL", 0.0)  # report every step
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    try:
        with pytest.raises(H.ExecutionFailed):
            _latent(runner, t2v_graph(True, steps=8, seed=11))
    finally:
        mm.interrupt_current_processing(False)
    assert any(e == "execution_interrupted" for e, _ in runner.server.messages)
    assert seen[:2] == [(1, 8), (2, 8)]  # one progress update per step
    assert remote.stats.forwards - forwards == 2  # one batched cond+uncond forward per step; none after Cancel
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    out = _latent(runner, t2v_graph(True, steps=2))
    assert torch.isfinite(out).all() and g.alive and g.launches == launches
