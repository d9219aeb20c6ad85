"""ComfyUI nodes (V3 schema): "XDit+USP Config" and "XDit+USP WanVideo Model Loader".

The loader's MODEL is a native ComfyUI Wan model (see xdit_usp_model.py) whose transformer forward
runs on a warm worker group with USP sequence parallelism; every sampling, LoRA and conditioning
node keeps working on it. This module imports ComfyUI's node API (`comfy_api.latest`), so only
ComfyUI imports it: the pack's __init__ does so lazily, from `comfy_entrypoint`.

Node ids, input names and their order are those of the saved workflows (example_workflows/):
changing any of them breaks workflows users have saved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import folder_paths
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .parallel import ConfigError, XDitUSPConfig
from .parallel.config import (ATTENTION_BACKENDS, COMM_DTYPES, COMM_OVERLAP, DEVICES, DTYPES, WEIGHT_DTYPES,
                              WEIGHT_SHARDING)

CATEGORY = "WanVideo/xDiT-USP"
# The loader's weight_dtype: a compute dtype (the worker group computes and holds weights in it), or
# an fp8 storage format for the Linear weights (computed in the config's dtype).
LOADER_WEIGHT_DTYPES = ("default",) + DTYPES + tuple(d for d in WEIGHT_DTYPES if d != "default") + ("fp8_e4m3fn_fast",)

XDitUSPConfigType = io.Custom("XDIT_USP_CONFIG")


class XDitUSPConfigNode(io.ComfyNode):
    """How the transformer is spread over the GPUs. Degrees of 0 are chosen automatically."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XDitUSPConfigNode",
            display_name="XDit+USP Config",
            category=CATEGORY,
            description=(
                "Worker group layout for the XDit+USP WanVideo loader: how many GPUs, how the sequence is split "
                "(Ulysses over heads, ring for the rest) and whether cond/uncond run on separate GPU groups (CFG). "
                "One worker group runs per set of GPUs: a changed config replaces the previous group on them."),
            inputs=[
                io.Int.Input("gpus", default=2, min=1, max=64,
                             tooltip="Worker processes: one per GPU (CPU ranks when device is cpu)."),
                io.Int.Input("ulysses_degree", default=0, min=0, max=64,
                             tooltip="Ulysses (all-to-all over heads) degree; 0 = auto. Must divide the head count."),
                io.Int.Input("ring_degree", default=0, min=0, max=64, tooltip="Ring-attention degree; 0 = auto."),
                io.Int.Input("cfg_degree", default=0, min=0, max=2,
                             tooltip="1 or 2 GPU groups for cond/uncond; 0 = auto (2 when the GPU count is even)."),
                io.Combo.Input("dtype", options=list(DTYPES), default="bf16",
                               tooltip="Compute dtype of the transformer on the workers."),
                io.Combo.Input("attention_backend", options=list(ATTENTION_BACKENDS), default="auto",
                               tooltip="Attention kernel on the workers; auto = cuDNN SDPA on CUDA. Ring attention "
                                       "(ring_degree > 1) needs one that returns the log-sum-exp (not sdpa or math)."),
                io.Float.Input("gpu_memory_fraction", default=1.0, min=0.05, max=1.0, step=0.05,
                               tooltip="Cap on each worker's CUDA memory, as a fraction of its GPU."),
                io.Combo.Input("device", options=list(DEVICES), default="cuda",
                               tooltip="cuda, or cpu (gloo ranks; for testing)."),
                io.Combo.Input("weight_sharding", options=list(WEIGHT_SHARDING), default="auto", optional=True,
                               tooltip="none: every GPU holds the whole model (fastest). fsdp: each GPU holds 1/N of "
                                       "the weights and gathers each block just before it runs (a 14B model fits "
                                       "24 GB cards at 2+ GPUs; a few percent slower with NVLink, more over PCIe). "
                                       "auto: fsdp only when the model would not fit otherwise."),
                io.Boolean.Input("compile", default=False, optional=True,
                                 tooltip="torch.compile each transformer block's per-token work (norms, modulation, "
                                         "FFN, RoPE) on the workers: faster steps after a first step that compiles "
                                         "(again at each new resolution). ComfyUI's TorchCompileModel node acts on "
                                         "this process, where no transformer runs; use this instead."),
                io.Int.Input("tensor_parallel_degree", default=1, min=1, max=64, optional=True,
                             tooltip="Tensor parallel: each GPU holds heads / N of every attention layer and 1/N of "
                                     "every FFN, and the GPUs add up their partial results after each (a reduce-scatter "
                                     "per layer, the tokens split over the GPUs between layers: for NVLink). The heads "
                                     "must divide by tensor × Ulysses. 1 = off."),
                io.Int.Input("pipeline_parallel_degree", default=1, min=1, max=64, optional=True,
                             tooltip="Pipeline parallel: each GPU holds a contiguous run of 1/N of the blocks and "
                                     "passes its hidden state to the next (the least traffic of any weight split: for "
                                     "PCIe); cond and uncond keep the stages busy. 1 = off. gpus = cfg × pipeline × "
                                     "tensor × ulysses × ring."),
                io.Combo.Input("comm_overlap", options=list(COMM_OVERLAP), default="auto", optional=True,
                               tooltip="Hide the sequence-parallel exchange behind attention by running it head "
                                       "group by head group (exact). auto: by the link the GPUs measure at load: on "
                                       "for slow links (PCIe without peer-to-peer), off on NVLink, where it costs "
                                       "more than it hides."),
                io.Combo.Input("comm_dtype", options=list(COMM_DTYPES), default="default", optional=True,
                               tooltip="What q/k/v and the attention output travel as between GPUs. fp8 sends about "
                                       "half the bytes (e4m3, one scale per token and head): faster on slow links, "
                                       "not exact (small differences in the video). CUDA with bf16/fp16 only."),
            ],
            outputs=[
                XDitUSPConfigType.Output(
                    "xdit_usp_config", display_name="xdit_usp_config",  # before 0.8.0 ComfyUI named outputs by display_name only
                    tooltip="The worker group layout; connect it to an XDit+USP WanVideo Model Loader."),
            ],
        )

    @classmethod
    def execute(cls, gpus, ulysses_degree, ring_degree, cfg_degree, dtype, attention_backend, gpu_memory_fraction,
                device, weight_sharding="auto", compile=False, tensor_parallel_degree=1,
                pipeline_parallel_degree=1, comm_overlap="auto", comm_dtype="default") -> io.NodeOutput:
        cfg = XDitUSPConfig(
            world_size=int(gpus), ulysses_degree=int(ulysses_degree), ring_degree=int(ring_degree),
            cfg_degree=int(cfg_degree), dtype=dtype, attention_backend=attention_backend,
            gpu_memory_fraction=float(gpu_memory_fraction), device=device, weight_sharding=weight_sharding or "auto",
            compile=bool(compile), tensor_parallel_degree=int(tensor_parallel_degree or 1),
            pipeline_parallel_degree=int(pipeline_parallel_degree or 1),
            comm_overlap=comm_overlap or "auto", comm_dtype=comm_dtype or "default",
        )
        with _node_words():
            cfg.validate()  # ConfigError saying what would work
        return io.NodeOutput(cfg)


class XDitUSPWanVideoModelLoader(io.ComfyNode):
    """Loads a Wan 2.1/2.2 transformer on the worker group; returns a native MODEL."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XDitUSPWanVideoModelLoader",
            display_name="XDit+USP WanVideo Model Loader",
            category=CATEGORY,
            description=(
                "Loads a WanVideo transformer (Wan 2.1 / 2.2: T2V, I2V, FLF2V, VACE, TI2V-5B; original, ComfyUI or "
                "diffusers layout; bf16/fp16/fp32/fp8) from diffusion_models onto the XDit+USP worker group. The "
                "MODEL works with every native sampling node; LoRAs (LoraLoaderModelOnly) and model merges are applied on "
                "the workers; a model patch the workers cannot honour is refused, naming its node, before sampling."),
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="A Wan transformer from models/diffusion_models."),
                io.Combo.Input("weight_dtype", options=list(LOADER_WEIGHT_DTYPES), default="default",
                               tooltip="dtype the workers hold and compute the weights in; default = the config's "
                                       "dtype (an fp8 file stays fp8). fp8_e4m3fn / fp8_e5m2: Linear weights held in "
                                       "fp8 (half of bf16) and upcast per layer, computed in the config's dtype. "
                                       "fp8_e4m3fn_fast: the blocks' matmuls also run in fp8 (inputs quantised per "
                                       "token; faster on cards with fp8 tensor cores, not exact). A "
                                       "value other than default needs its own worker group, which replaces the "
                                       "config's group on these GPUs while in use (models on the other group reload "
                                       "when next used)."),
                XDitUSPConfigType.Input("xdit_usp_config", tooltip="From an XDit+USP Config node."),
            ],
            outputs=[
                io.Model.Output(tooltip="A native Wan MODEL whose transformer forward runs on the worker group; "
                                        "use it like the output of Load Diffusion Model."),
            ],
        )

    @classmethod
    def execute(cls, unet_name, weight_dtype, xdit_usp_config) -> io.NodeOutput:
        from .parallel.memory import card_bytes, plan_load
        from .wan_to_xdit_mapping import inspect_checkpoint
        from .xdit_usp_model import build_model_patcher

        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        cfg = xdit_usp_config
        if not isinstance(cfg, XDitUSPConfig):
            raise ValueError(f"xdit_usp_config must come from an XDit+USP Config node, got {type(cfg).__name__}")
        if weight_dtype == "fp8_e4m3fn_fast":  # ComfyUI's name: fp8 storage and fp8 matmuls
            cfg = dataclasses.replace(cfg, weight_dtype="fp8_e4m3fn", fp8_matmul=True)
        elif weight_dtype in WEIGHT_DTYPES[1:] and weight_dtype != cfg.weight_dtype:
            cfg = dataclasses.replace(cfg, weight_dtype=weight_dtype)  # fp8 storage, the config's compute dtype
        elif weight_dtype in DTYPES and weight_dtype != cfg.dtype:
            cfg = dataclasses.replace(cfg, dtype=weight_dtype)
        ckpt = inspect_checkpoint(path)  # header only; a bad file fails here
        with _node_words():
            cfg.validate()
            cfg.plan(ckpt.num_heads)  # a layout or kernel that cannot run this model fails here, before any launch
            plan_load(ckpt, cfg, card_bytes(cfg))  # and so does a model that cannot fit (weights, standard size)
        return io.NodeOutput(build_model_patcher(cfg, os.path.abspath(path), ckpt))


# The Config node's words for the settings that config errors name (see ConfigError.render).
NODE_LABELS = {"world_size": "gpus"}


@contextlib.contextmanager
def _node_words():
    """Config errors worded with the node's input names (`gpus`, not `world_size`)."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(e.render(NODE_LABELS)) from None


class XDitUSPExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .nodes_xdit_usp_vae import NODES as VAE_NODES

        return [XDitUSPConfigNode, XDitUSPWanVideoModelLoader, *VAE_NODES]
