"""ComfyUI nodes (V3 schema): "XDit+USP VAE Decode" and "XDit+USP VAE Encode".

They take ComfyUI's own VAE object (any VAE loader) and run the Wan VAE on every rank of the
config's worker group, each rank on a band of rows (parallel/sp_vae.py): the result is the one-GPU
decode, not a tiled one. Pre- and post-processing are the VAE object's own (`vae_encode_crop_pixels`,
`process_input`, `process_output`), so the IMAGE and LATENT are laid out exactly as native
VAEDecode / VAEEncode lay them out. The weights cross to the workers once per VAE (cached there by
content) and the VAE object's weights are never moved onto ComfyUI's GPU by these nodes.

This module imports ComfyUI's node API, so only ComfyUI imports it (from the loader's extension).
"""
from __future__ import annotations

import logging
import weakref

import torch
from comfy_api.latest import io

from .nodes_xdit_usp_loader import CATEGORY, XDitUSPConfigType, _node_words
from .parallel import XDitUSPConfig

log = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# first_stage_model -> (fingerprint, key): the content key of a VAE object's weights, so the
# weights are hashed once and not on every decode. The fingerprint (each tensor's storage address
# and in-place version counter, where it has one) changes when a weight is replaced or modified;
# the weak key keeps addresses from being reused by another VAE while the entry lives.
_KEYS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _version(t: torch.Tensor):
    """The tensor's in-place version counter; None for an inference tensor (ComfyUI loads under
    torch.inference_mode), which has none: its storage address alone then names it."""
    try:
        return t._version
    except RuntimeError:
        return None


def _prepare(vae, cfg) -> tuple:
    """(group, key) with the VAE's weights held by the group's ranks. Everything that can be wrong
    with the inputs fails here, before a worker starts."""
    from .parallel.launcher import vae_group, vae_key
    from .wan_to_xdit_mapping import inspect_vae, vae_to_diffusers

    if not isinstance(cfg, XDitUSPConfig):
        raise ValueError(f"xdit_usp_config must come from an XDit+USP Config node, got {type(cfg).__name__}")
    with _node_words():
        cfg.validate()
    model = getattr(vae, "first_stage_model", None)
    if model is None:
        raise ValueError("the VAE input holds no model (a checkpoint without a VAE?)")
    state = model.state_dict()
    info = inspect_vae(state)  # CheckpointError for anything but a Wan 2.1 / 2.2 VAE
    dtype = _DTYPE_NAMES.get(getattr(vae, "vae_dtype", torch.float32), "fp32")
    fingerprint = (dtype, tuple((k, t.data_ptr(), _version(t)) for k, t in state.items()))
    cached = _KEYS.get(model)
    if cached is not None and cached[0] == fingerprint:
        key = cached[1]
    else:
        key = vae_key(vae_to_diffusers(state, info)[0], dtype)
        _KEYS[model] = (fingerprint, key)
    group = vae_group(cfg, on_evict=lambda g: log.warning(
        "xDiT-USP: closing a worker group on the same devices to run the VAE on %d worker(s)", cfg.world_size))
    if group.vae is None or group.vae[0] != key or not group.alive:
        log.info("xDiT-USP: sending the Wan %s VAE to %d worker(s)", info.version, cfg.world_size)
    key = group.vae_load(state, dtype, key=key)
    return group, key


_PROBE = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.25, 1.0, 3.0])


def _wan_process_output(vae) -> bool:
    """Whether the VAE object's process_output is ComfyUI's default, (x + 1) / 2 clamped to [0, 1]
    (what its Wan VAEs use), which the ranks then apply themselves (probed on a few values: a
    patched VAE object keeps its own, applied here as before)."""
    try:
        got = vae.process_output(_PROBE.clone())
    except Exception:  # noqa: BLE001 (anything unusual: leave it to the VAE object)
        return False
    return isinstance(got, torch.Tensor) and torch.equal(got, _PROBE.add(1.0).div(2.0).clamp(0.0, 1.0))


class XDitUSPVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XDitUSPVAEDecode",
            display_name="XDit+USP VAE Decode",
            category=CATEGORY,
            description=(
                "VAE Decode for the Wan 2.1 / 2.2 VAE on every GPU of the XDit+USP worker group: the latent is split "
                "by rows, neighbouring GPUs exchange the rows each convolution needs, so the video equals the "
                "one-GPU decode (no tiles, no seams) at a fraction of the time and of the memory per GPU. Native "
                "VAE Decode still works on the same latent."),
            inputs=[
                io.Latent.Input("samples", tooltip="The latent to decode (from the sampler)."),
                io.Vae.Input("vae", tooltip="A Wan 2.1 or Wan 2.2 VAE, from any VAE loader."),
                XDitUSPConfigType.Input("xdit_usp_config",
                                        tooltip="From an XDit+USP Config node: its GPUs decode (its warm workers "
                                                "are reused)."),
            ],
            outputs=[io.Image.Output(tooltip="The decoded frames, as native VAE Decode returns them.")],
        )

    @classmethod
    def execute(cls, samples, vae, xdit_usp_config) -> io.NodeOutput:
        latent = samples["samples"]
        if latent.is_nested:
            latent = latent.unbind()[0]
        group, key = _prepare(vae, xdit_usp_config)
        if _wan_process_output(vae):
            # the ranks write the IMAGE itself: [B * frames, H, W, C] in [0, 1], fp32, each its rows
            images = group.vae_decode(key, latent, image=True)
            if vae.vae_output_dtype() != torch.float32:
                images = images.to(vae.vae_output_dtype())
            return io.NodeOutput(images.to(vae.output_device))
        images = group.vae_decode(key, latent)  # [B, C, frames, H, W] in [-1, 1], fp32
        images = vae.process_output(images.to(vae.vae_output_dtype()))
        images = images.to(vae.output_device).movedim(1, -1)
        if images.ndim == 5:  # the batch's videos one after another, as native VAEDecode returns them
            images = images.reshape(-1, *images.shape[-3:])
        return io.NodeOutput(images)


class XDitUSPVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XDitUSPVAEEncode",
            display_name="XDit+USP VAE Encode",
            category=CATEGORY,
            description=(
                "VAE Encode for the Wan 2.1 / 2.2 VAE on every GPU of the XDit+USP worker group, split by rows and "
                "exact (the one-GPU result): frames in (an IMAGE batch is one video), LATENT out, as native VAE "
                "Encode. For the start images or control video of I2V, FLF2V and VACE graphs."),
            inputs=[
                io.Image.Input("pixels", tooltip="The frames to encode: one video, frames in order."),
                io.Vae.Input("vae", tooltip="A Wan 2.1 or Wan 2.2 VAE, from any VAE loader."),
                XDitUSPConfigType.Input("xdit_usp_config", tooltip="From an XDit+USP Config node."),
            ],
            outputs=[io.Latent.Output(tooltip="The latent, as native VAE Encode returns it.")],
        )

    @classmethod
    def execute(cls, pixels, vae, xdit_usp_config) -> io.NodeOutput:
        group, key = _prepare(vae, xdit_usp_config)
        # VAE.encode's own steps: crop to the compression, channels first, frames as one video
        x = vae.vae_encode_crop_pixels(pixels).movedim(-1, 1)
        if x.ndim < 5:
            x = x.movedim(1, 0).unsqueeze(0)  # [F, C, H, W] -> [1, C, F, H, W]
        x = vae.process_input(x)
        latent = group.vae_encode(key, x).to(vae.output_device, vae.vae_output_dtype())
        return io.NodeOutput({"samples": latent})


NODES = [XDitUSPVAEDecode, XDitUSPVAEEncode]
