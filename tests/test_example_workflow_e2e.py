"""The shipped example workflow, end to end in real ComfyUI on the CPU, with tiny random model files.

`example_workflows/xdit_usp_example.json` is converted UI -> API with workflow_utils.ui_to_api and run
through ComfyUI's own PromptExecutor (tests/comfy_harness.py): CLIPLoader(type "wan") -> CLIPTextEncode x2,
XDit+USP Config -> XDit+USP WanVideo Model Loader (2 gloo ranks on the CPU, fp32), ModelSamplingSD3,
KSampler, EmptyHunyuanLatentVideo, VAELoader -> XDit+USP VAE Decode -> CreateVideo -> SaveVideo. Only these widget
values are changed: config device "cpu", dtype "fp32", gpus 2; the three file names; latent 64x64x5;
KSampler steps 2. SaveVideo writes into a temporary output directory.

Everything is real ComfyUI code except the size of the model files, which are random checkpoints made here:
 - diffusion model: tiny Wan 2.1 T2V (dim 256, 2 layers; parallel/tiny.py) in original key layout, with
   text_dim = the text encoder's width (told to ComfyUI through the file's metadata, as the integration
   test does: ComfyUI assumes 4096 otherwise).
 - VAE: ComfyUI's own Wan 2.1 VAE module (comfy.ldm.wan.vae.WanVAE, dim 96 as detected from the file:
   the real architecture and key names, ~127M parameters), random weights, saved in bf16 like
   Comfy-Org's wan_2.1_vae.safetensors.
 - text encoder: a umT5 checkpoint with the real key names and the structure ComfyUI's detection
   requires (24 encoder blocks, gated FFN d_ff 10240, per-layer relative attention bias) but narrow.
   ONE MONKEYPATCH, in this test process only: `comfy.sd.load_clip` is wrapped so that, for
   CLIPType.WAN, it adds `model_options["umt5xxl_model_config"] = TINY_UMT5` -- ComfyUI's own per-model
   config override hook (comfy/sd1_clip.py SDClipModel: `{model_name}_model_config` keys replace keys
   of umt5_config_xxl.json). It changes d_model 4096 -> 32, num_heads 64 -> 2, d_kv 64 -> 16 and
   vocab_size 256384 -> 512; nothing else. Without it ComfyUI would build the 5.7B XXL encoder.
 - tokenizer: ComfyUI's Wan tokenizer reads its SentencePiece model from the checkpoint's
   "spiece_model" tensor (the real umT5 spiece model is not in the ComfyUI tree). We train a small
   SentencePiece model here (offline, umT5's special ids: pad 0, eos 1, unk 2, no bos) and store it there.

Checks: the prompt executes, SaveVideo writes a non-empty video (5 frames of 64x64) into the temporary
output directory, the KSampler latent is finite, and the same prompt with the native UNETLoader in place
of our two nodes gives a latent within 1e-4 relative of ours.
"""
from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workflow_utils as W  # noqa: E402

import comfy_harness as H  # noqa: E402

NODES = H.boot_or_skip()

import folder_paths  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.text_encoders.t5  # noqa: E402
import comfy.ldm.wan.vae  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

PACK = H.pack_module()
PAR = importlib.import_module(PACK.__name__ + ".parallel")
TINY = importlib.import_module(PACK.__name__ + ".parallel.tiny")
MAPPING = importlib.import_module(PACK.__name__ + ".wan_to_xdit_mapping")

TOL = 1e-4
TEXT_DIM = 32  # the tiny umT5's d_model = the tiny Wan's text_dim
TINY_UMT5 = {"d_model": TEXT_DIM, "num_heads": 2, "d_kv": 16, "vocab_size": 512}
SIZE = dict(width=64, height=64, length=5)  # latent 16 x 2 x 8 x 8
STEPS = 2
FILES = {"diffusion_models": "tiny_wan21_t2v.safetensors", "text_encoders": "tiny_umt5_xxl_layout.safetensors",
         "vae": "wan_2.1_vae_random.safetensors"}

CAPTURED = H.CAPTURED
NODES.NODE_CLASS_MAPPINGS["XDitE2ECaptureLatent"] = H.CaptureLatent


# ------------------------------------------------------------------------------ tiny model files
def _fill(module, seed, std_of=lambda p: 1.0 / max(1, p[0].numel()) ** 0.5):
    """Deterministic random weights: norms 1, biases 0, the rest randn / sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma") or (p.ndim == 1 and name.endswith("weight")):  # RMS/layer norm scales
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std_of(p))
    return module


def _spiece_model(texts) -> torch.Tensor:
    """A small SentencePiece model with umT5's special ids, serialized the way ComfyUI stores it."""
    import sentencepiece as spm

    corpus = list(texts) + [
        "a cat walks across a sunny garden", "waves crash on a rocky shore at dusk", "a city street at night in rain",
        "slow motion of a hummingbird drinking nectar", "low quality, blurry, static, oversaturated, watermark",
    ] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=TINY_UMT5["vocab_size"],
                                   hard_vocab_limit=False, character_coverage=1.0, model_type="unigram",
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    assert sp.get_piece_size() <= TINY_UMT5["vocab_size"] and (sp.pad_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8).clone()


def _write_text_encoder(path, texts):
    with open(os.path.join(os.path.dirname(comfy.text_encoders.t5.__file__), "umt5_config_xxl.json")) as f:
        config = {**json.load(f), **TINY_UMT5}
    t5 = comfy.text_encoders.t5.T5(config, torch.float32, "cpu", comfy.ops.manual_cast)
    _fill(t5, seed=10)
    sd = {k: v.contiguous() for k, v in t5.state_dict().items()}
    assert sd["encoder.block.23.layer.1.DenseReluDense.wi_1.weight"].shape[0] == 10240  # what detection keys on
    sd["spiece_model"] = _spiece_model(texts)
    save_file(sd, path)


def _write_vae(path):
    vae = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], dropout=0.0)
    _fill(vae, seed=20)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in vae.state_dict().items()}, path)


def _write_diffusion_model(path):
    cfg = dict(TINY.tiny_config("t2v"), text_dim=TEXT_DIM)
    model = TINY.model_class("t2v")(**cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    sd = MAPPING.to_original(model.state_dict())
    save_file({k: v.contiguous() for k, v in sd.items()}, path,
              metadata={"config": json.dumps({"transformer": {"text_dim": TEXT_DIM}})})


# -------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def env():
    wf = W.load_example()
    texts = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "CLIPTextEncode"]
    d = tempfile.mkdtemp(prefix="xdit_usp_e2e_")
    t0 = time.time()
    dirs = {}
    for folder in FILES:
        dirs[folder] = os.path.join(d, folder)
        os.makedirs(dirs[folder])
    _write_diffusion_model(os.path.join(dirs["diffusion_models"], FILES["diffusion_models"]))
    _write_text_encoder(os.path.join(dirs["text_encoders"], FILES["text_encoders"]), texts)
    _write_vae(os.path.join(dirs["vae"], FILES["vae"]))
    print(f"\n[e2e] tiny model files written in {time.time() - t0:.1f}s")
    for folder, path in dirs.items():
        folder_paths.add_model_folder_path(folder, path)
    out_dir = os.path.join(d, "output")
    os.makedirs(out_dir)
    old_out = folder_paths.get_output_directory()
    folder_paths.set_output_directory(out_dir)

    # The one monkeypatch (see the module docstring): a narrow umT5 through ComfyUI's config override hook.
    real_load_clip = comfy.sd.load_clip

    def load_clip(ckpt_paths, embedding_directory=None, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                  model_options={}, disable_dynamic=False):
        if clip_type == comfy.sd.CLIPType.WAN:
            model_options = {**model_options, "umt5xxl_model_config": dict(TINY_UMT5)}
        return real_load_clip(ckpt_paths, embedding_directory, clip_type, model_options, disable_dynamic)

    comfy.sd.load_clip = load_clip
    try:
        yield {"workflow": wf, "out_dir": out_dir, "runner": H.Runner()}
    finally:
        comfy.sd.load_clip = real_load_clip
        PAR.close_all_groups()
        mm.unload_all_models()
        folder_paths.set_output_directory(old_out)
        for folder, path in dirs.items():  # later tests must not list a deleted folder
            folder_paths.folder_names_and_paths[folder][0].remove(path)
        folder_paths.filename_list_cache.clear()
        shutil.rmtree(d, ignore_errors=True)


def example_prompt(workflow, ours: bool) -> dict:
    """The example workflow in API format with only the widget values a CPU run needs changed."""
    api = W.ui_to_api(workflow, NODES.NODE_CLASS_MAPPINGS)
    by_type = {}
    for nid, node in api.items():
        by_type.setdefault(node["class_type"], []).append(nid)
    cfg, loader = by_type["XDitUSPConfigNode"][0], by_type["XDitUSPWanVideoModelLoader"][0]
    api[cfg]["inputs"].update(device="cpu", dtype="fp32", gpus=2)
    api[loader]["inputs"]["unet_name"] = FILES["diffusion_models"]
    api[by_type["CLIPLoader"][0]]["inputs"]["clip_name"] = FILES["text_encoders"]
    api[by_type["VAELoader"][0]]["inputs"]["vae_name"] = FILES["vae"]
    api[by_type["EmptyHunyuanLatentVideo"][0]]["inputs"].update(SIZE)
    ks = by_type["KSampler"][0]
    api[ks]["inputs"]["steps"] = STEPS
    if not ours:  # the native graph: UNETLoader in place of Config + Loader, same file, weight_dtype default,
        del api[cfg]  # and native VAEDecode in place of XDit+USP VAE Decode
        api[loader] = {"class_type": "UNETLoader",
                       "inputs": {"unet_name": FILES["diffusion_models"], "weight_dtype": "default"}}
        dec = by_type["XDitUSPVAEDecode"][0]
        api[dec] = {"class_type": "VAEDecode", "inputs": {k: v for k, v in api[dec]["inputs"].items()
                                                          if k != "xdit_usp_config"}}
    api["capture"] = {"class_type": "XDitE2ECaptureLatent", "inputs": {"samples": [ks, 0], "key": "ks"}}
    return api


def _run(runner, prompt, outputs, must_execute):
    CAPTURED.clear()
    t0 = time.time()
    messages = runner.run(prompt, outputs)
    executed = {d.get("node") for e, d in messages if e == "executing"}
    assert set(must_execute) <= executed, (must_execute, executed)  # not served from ComfyUI's cache
    return CAPTURED["ks"].float(), time.time() - t0


# ------------------------------------------------------------------------------------------ test
def test_example_workflow_runs_end_to_end_and_matches_native(env):
    runner, wf, out_dir = env["runner"], env["workflow"], env["out_dir"]
    prompt = example_prompt(wf, ours=True)
    save = next(nid for nid, n in prompt.items() if n["class_type"] == "SaveVideo")
    assert {n["class_type"] for n in prompt.values()} == W.NATIVE_TYPES | W.OUR_TYPES | {"XDitE2ECaptureLatent"}

    ks = next(nid for nid, n in prompt.items() if n["class_type"] == "KSampler")
    ours, t_ours = _run(runner, prompt, [save, "capture"], must_execute=set(prompt))
    assert ours.shape == (1, 16, 2, 8, 8)
    assert torch.isfinite(ours).all()

    videos = [os.path.join(r, f) for r, _, fs in os.walk(out_dir) for f in fs]
    assert len(videos) == 1 and os.path.getsize(videos[0]) > 0, videos
    prefix = prompt[save]["inputs"]["filename_prefix"]
    assert os.path.relpath(videos[0], out_dir).startswith(prefix), videos
    import av  # what SaveVideo itself writes with

    with av.open(videos[0]) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == SIZE["length"] and frames[0].shape == (SIZE["height"], SIZE["width"], 3)
    pixels = torch.from_numpy(np.stack(frames)).float()
    assert pixels.std() > 1.0, "the decoded video is flat"  # random VAE weights, but not a degenerate output

    native, t_native = _run(runner, example_prompt(wf, ours=False), ["capture"], must_execute={ks})
    err = ((ours - native).abs().max() / native.abs().max()).item()
    print(f"\n[e2e] ours (example workflow, 2 CPU ranks) {t_ours:.1f}s incl. text encoder + VAE decode + video; "
          f"native (cached text/latent) {t_native:.2f}s; video {os.path.relpath(videos[0], out_dir)} "
          f"{os.path.getsize(videos[0])} bytes, {len(frames)} frames (pixel mean {pixels.mean():.0f}, std "
          f"{pixels.std():.0f}); max rel err vs native {err:.2e}")
    assert err < TOL
