"""Wan transformer checkpoints -> diffusers ``WanTransformer3DModel`` / ``WanVACETransformer3DModel`` names.

Data first: ``RULES`` is the whole original->diffusers key table (checked against
diffusers' ``transformer_wan.py`` / ``transformer_wan_vace.py`` and its single-file converter
``convert_wan_transformer_to_diffusers``).  The inverse table is generated from the same data.  The
original Wan layout stores every tensor with the diffusers shape (``blocks.N.modulation`` is
``[1, 6, dim]`` = ``blocks.N.scale_shift_table``; ``head.modulation`` is ``[1, 2, dim]`` = top-level
``scale_shift_table``), so conversion is rename-only.

Layouts accepted: original Wan / WanVideoWrapper names ("original"), the same with a ComfyUI prefix
``model.diffusion_model.`` / ``diffusion_model.`` / ``model.`` ("comfyui"), and diffusers names, as a
single file or a folder with ``config.json`` + shards ("diffusers").  Weights may be bf16/fp16/fp32,
plain float8 (kept as float8 when ``dtype`` is None: the runtime casts) or ComfyUI "scaled fp8"
(dequantised: ``fp8.float() * scale``, returned as bfloat16 when ``dtype`` is None).  Any other dtype
is refused.

Only torch + safetensors are needed at import; diffusers is imported lazily to build a meta-device model
whose parameter names and shapes every checkpoint is validated against (exact, no memory).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import struct
from collections import Counter
from typing import Any, Callable, Iterable, Iterator

import torch

__all__ = [
    "CheckpointInfo", "CheckpointError", "RULES", "load_checkpoint", "inspect_checkpoint",
    "convert_state_dict", "to_original", "read_header", "convert_lora", "lora_delta", "original_to_diffusers_key",
    "diffusers_to_original_key",
]

HEAD_DIM = 128  # Wan's head_dim is always 128 (RoPE split 44/42/42)

# --------------------------------------------------------------------------------------------------
# The key table.  "{N}" is a block index.  Each entry names a module or parameter ("stem"); a key is
# the stem itself (parameters: modulation, emb_pos) or the stem + ".weight" / ".bias".
_TOP_RULES = [
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),  # FLF2V
    ("vace_patch_embedding", "vace_patch_embedding"),
]
_BLOCK_RULES = [
    ("modulation", "scale_shift_table"),
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("cross_attn.k_img", "attn2.add_k_proj"),
    ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ("norm3", "norm2"),  # original norm3 = affine norm before cross-attn; norm1/norm2 have no params
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
]
_VACE_BLOCK_RULES = [("before_proj", "proj_in"), ("after_proj", "proj_out")]

#: (original stem, diffusers stem) pairs; the complete table.
RULES: list[tuple[str, str]] = (
    _TOP_RULES
    + [(f"blocks.{{N}}.{o}", f"blocks.{{N}}.{d}") for o, d in _BLOCK_RULES]
    + [(f"vace_blocks.{{N}}.{o}", f"vace_blocks.{{N}}.{d}") for o, d in _BLOCK_RULES + _VACE_BLOCK_RULES]
)

_SUFFIX = r"((?:\.weight|\.bias)?)"


def _compile(stem: str, sep: str = ".") -> re.Pattern:
    parts = [re.escape(p) if p != "{N}" else r"(\d+)" for p in re.split(r"(\{N\})", stem) if p]
    pat = "".join(parts)
    if sep != ".":
        pat = pat.replace(r"\.", sep)
    return re.compile(pat)


def _fill(template: str, num: str | None) -> str:
    return template.replace("{N}", num) if num is not None else template


# (compiled full-key regex, target template) in both directions, generated from RULES.
_FWD = [(re.compile(_compile(o).pattern + _SUFFIX), d) for o, d in RULES]
_INV = [(re.compile(_compile(d).pattern + _SUFFIX), o) for o, d in RULES]
# kohya "lora_unet_blocks_0_self_attn_q": module stems with "." written as "_".
_KOHYA = [(_compile(o, sep="_"), o) for o, _ in RULES]


def _rename(key: str, table) -> str | None:
    hits = []
    for rx, tmpl in table:
        m = rx.fullmatch(key)
        if m:
            groups = m.groups()
            num = groups[0] if len(groups) == 2 else None
            hits.append(_fill(tmpl, num) + groups[-1])
    if len(hits) > 1:  # the table is built to be unambiguous; guard against future edits
        raise AssertionError(f"ambiguous key {key!r}: {hits}")
    return hits[0] if hits else None


def original_to_diffusers_key(key: str) -> str | None:
    """One original (unprefixed) key -> its diffusers name, or None when the table has no rule."""
    return _rename(key, _FWD)


def diffusers_to_original_key(key: str) -> str | None:
    """One diffusers key -> its original Wan name, or None when the table has no rule."""
    return _rename(key, _INV)


# --------------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """Bad checkpoint: message names the file and the first offending keys, as that file writes them."""


@dataclasses.dataclass
class CheckpointInfo:
    format: str                 # "original" | "comfyui" | "diffusers"
    variant: str                # "t2v" | "i2v" | "flf2v" | "vace" | "ti2v_5b"
    diffusers_class: str        # "WanTransformer3DModel" | "WanVACETransformer3DModel"
    diffusers_config: dict      # kwargs that build diffusers_class with exactly the converted keys
    source_dtype: str           # most common weight dtype in the file, e.g. "bfloat16", "float8_e4m3fn"
    path: str | None
    num_layers: int
    num_heads: int
    dim: int
    prefix: str = ""            # stripped key prefix ("" when none)
    scaled_fp8: bool = False    # True when scaled-fp8 weights were (or will be) dequantised
    num_tensors: int = 0        # tensors after conversion


_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
_DROP_SUFFIXES = (".input_scale",)
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_SAFE_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _where(path) -> str:
    return f"{path}" if path else "<state_dict>"


def _first(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    s = ", ".join(repr(k) for k in keys[:n])
    return s + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


_FLOAT_DTYPES = {_dtype_name(d) for d in _SAFE_DTYPES.values() if d.is_floating_point}  # incl. float8


@dataclasses.dataclass
class _Plan:
    info: CheckpointInfo
    items: list  # (source key, target diffusers key, scale source key | None)


@dataclasses.dataclass(frozen=True)
class _Names:
    """Writes a key the way the user's file does (``prefix`` + original or diffusers name), so errors
    name keys as they are, or would be, written in that file."""
    fmt: str
    prefix: str

    def from_original(self, key: str) -> str:
        return self.prefix + ((original_to_diffusers_key(key) or key) if self.fmt == "diffusers" else key)

    def from_diffusers(self, key: str) -> str:
        return self.prefix + (key if self.fmt == "diffusers" else (diffusers_to_original_key(key) or key))


def _plan(meta: dict[str, tuple[tuple, str]], path, config_json: dict | None = None,
          known: CheckpointInfo | None = None) -> _Plan:
    """meta: raw key -> (shape, dtype name).  Works out format, renames, dequant pairs, config; validates.
    ``known``: the info an earlier, validated read of the same file gave; detection and the shape
    check against the diffusers class are skipped (the names are still worked out from ``meta``)."""
    where = _where(path)
    keys = set(meta)
    if not keys:
        raise CheckpointError(f"{where}: no tensors")
    # 1. prefix
    prefix = ""
    for p in _PREFIXES:
        if any(k.startswith(p) for k in keys):
            prefix = p
            break
    marker = {k for k in keys if k in ("scaled_fp8", prefix + "scaled_fp8")}
    if prefix:
        stray = {k for k in keys - marker if not k.startswith(prefix)}
        if stray:
            raise CheckpointError(f"{where}: mixed key prefixes; keys without {prefix!r}: {_first(stray)}")
    names = {k[len(prefix):]: k for k in keys - marker}
    # 2. side tensors: scales, input scales, per-layer quant descriptors
    scales, dropped = {}, set()
    for n in list(names):
        if n.endswith(_DROP_SUFFIXES) or n.endswith(".comfy_quant"):
            dropped.add(n)
        elif n.endswith(_SCALE_SUFFIXES):
            scales[n.rsplit(".", 1)[0] + ".weight"] = names[n]
    for n in dropped | {n for n in names if n.endswith(_SCALE_SUFFIXES)}:
        names.pop(n)
    orphan = [k for n, k in scales.items() if n not in names]
    if orphan:
        raise CheckpointError(f"{where}: scale tensors without a weight: {_first(orphan)}")
    scaled = bool(scales) or bool(marker)
    # 3. layout
    fwd = {n: original_to_diffusers_key(n) for n in names}
    inv = {n: diffusers_to_original_key(n) for n in names}
    n_orig, n_diff = sum(v is not None for v in fwd.values()), sum(v is not None for v in inv.values())
    if n_orig == 0 and n_diff == 0:
        raise CheckpointError(f"{where}: unknown layout, not a Wan transformer; first keys: {_first(keys)}")
    if n_orig >= n_diff:
        fmt, mapping = ("comfyui" if prefix else "original"), fwd
        bad = [names[n] for n, v in fwd.items() if v is None]
    else:
        fmt, mapping = "diffusers", {n: n for n in names}
        bad = [names[n] for n, v in inv.items() if v is None]
    if bad:
        raise CheckpointError(f"{where}: unexpected keys for a Wan {fmt} checkpoint: {_first(bad)}")
    in_file = _Names(fmt, prefix)
    # 4. dtypes, from the header: every weight is floating point (fp8 included; scales and markers are not weights)
    not_float = sorted(k for k in names.values() if meta[k][1] not in _FLOAT_DTYPES)
    if not_float:
        listed = ", ".join(f"{k!r} ({meta[k][1]})" for k in not_float[:5])
        more = f" (+{len(not_float) - 5} more)" if len(not_float) > 5 else ""
        raise CheckpointError(f"{where}: tensors that are not floating point (Wan weights are "
                              f"bf16/fp16/fp32/fp8): {listed}{more}")
    if known is not None:
        items = [(src, mapping[n], scales.get(n)) for n, src in sorted(names.items())]
        return _Plan(known, items)
    # 5. detection on original-named shapes
    orig_shapes = {(n if fmt != "diffusers" else inv[n]): tuple(meta[src][0]) for n, src in names.items()}
    cfg, variant = _detect(orig_shapes, where, in_file.from_original)
    if config_json:
        cfg = _merge_config_json(cfg, config_json, where)
    cls_name = "WanVACETransformer3DModel" if "vace_layers" in cfg else "WanTransformer3DModel"
    # 6. validate names and shapes against the real class (meta device)
    expected = _expected_shapes(cls_name, json.dumps(cfg, sort_keys=True))
    got = {mapping[n]: tuple(meta[src][0]) for n, src in names.items()}
    missing, unexpected = set(expected) - set(got), set(got) - set(expected)
    if missing:
        raise CheckpointError(f"{where}: missing keys for {variant} ({cls_name}): "
                              f"{_first(map(in_file.from_diffusers, missing))}")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected keys for {variant} ({cls_name}): "
                              f"{_first(map(in_file.from_diffusers, unexpected))}")
    wrong = sorted(f"{in_file.from_diffusers(k)!r} is {got[k]}, expected {expected[k]}"
                   for k in got if got[k] != expected[k])
    if wrong:
        more = f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else ""
        raise CheckpointError(f"{where}: wrong shapes: {'; '.join(wrong[:5])}{more}")
    dts = Counter(meta[src][1] for n, src in names.items() if n.endswith(".weight"))
    dim = cfg["num_attention_heads"] * HEAD_DIM
    info = CheckpointInfo(
        format=fmt, variant=variant, diffusers_class=cls_name, diffusers_config=cfg,
        source_dtype=dts.most_common(1)[0][0] if dts else "unknown", path=str(path) if path else None,
        num_layers=cfg["num_layers"], num_heads=cfg["num_attention_heads"], dim=dim, prefix=prefix,
        scaled_fp8=scaled, num_tensors=len(names),
    )
    items = [(src, mapping[n], scales.get(n)) for n, src in sorted(names.items())]
    return _Plan(info, items)


def _count(shapes, head: str) -> int:
    idx = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(head) + r"\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


# Where a checkpoint shows each size the config is detected from: (original key, axis).  Most sizes
# are written in many tensors (ffn_dim in three tensors of every block).  Detection takes the value
# most of them agree on, so one tensor with a wrong shape is reported as itself, instead of setting
# the config and making every tensor that agrees with the real model look wrong.
_SIZES: dict[str, list[tuple[str, int | slice]]] = {
    "dim": [("head.modulation", -1), ("patch_embedding.weight", 0), ("patch_embedding.bias", 0),
            ("head.head.weight", 1), ("text_embedding.0.weight", 0), ("time_embedding.0.weight", 0),
            ("blocks.{N}.modulation", -1), ("blocks.{N}.self_attn.q.weight", 0),
            ("blocks.{N}.self_attn.o.weight", 0), ("blocks.{N}.cross_attn.q.weight", 0),
            ("blocks.{N}.ffn.0.weight", 1), ("blocks.{N}.ffn.2.weight", 0)],
    "ffn_dim": [("blocks.{N}.ffn.0.weight", 0), ("blocks.{N}.ffn.0.bias", 0), ("blocks.{N}.ffn.2.weight", 1)],
    "patch_size": [("patch_embedding.weight", slice(2, None)), ("vace_patch_embedding.weight", slice(2, None))],
    "in_channels": [("patch_embedding.weight", 1)],
    "out_channels * patch volume": [("head.head.weight", 0), ("head.head.bias", 0)],
    "text_dim": [("text_embedding.0.weight", 1)],
    "freq_dim": [("time_embedding.0.weight", 1)],
    "image_dim": [("img_emb.proj.0.weight", 0), ("img_emb.proj.0.bias", 0), ("img_emb.proj.1.weight", 0),
                  ("img_emb.proj.1.weight", 1), ("img_emb.proj.1.bias", 0), ("img_emb.proj.3.weight", 1),
                  ("img_emb.emb_pos", 2)],
    "pos_embed_seq_len": [("img_emb.emb_pos", 1)],
    "vace_in_channels": [("vace_patch_embedding.weight", 1)],
}
_LATENT_CHANNELS = (16, 48)  # Wan 2.1 / Wan 2.2 VAE: the only output channel counts a Wan model has


def _size(s: dict[str, tuple], size: str, layers: int, where: str, name: Callable[[str], str],
          valid: tuple[str, Callable[[Any], bool]] | None = None, prefer: Callable[[Any], bool] | None = None):
    """The value of ``size`` most tensors of ``_SIZES[size]`` agree on.

    ``valid``: (what a value must be, test); a value that fails it loses to any that passes.
    ``prefer(v)`` breaks a tie in the count.  When no value is valid, or a tie remains, the error
    names the tensors and their shapes.
    """
    votes: dict[Any, list[str]] = {}
    for pattern, axis in _SIZES[size]:
        for key in [pattern.replace("{N}", str(i)) for i in range(layers)] if "{N}" in pattern else [pattern]:
            shape = s.get(key)
            if shape is None or (isinstance(axis, int) and not -len(shape) <= axis < len(shape)):
                continue  # absent, or too few dimensions: validation against the model names it
            votes.setdefault(shape[axis] if isinstance(axis, int) else tuple(shape[axis]), []).append(key)
    if not votes:
        raise CheckpointError(f"{where}: missing keys: {name(_SIZES[size][0][0].replace('{N}', '0'))!r}")

    def rank(v):
        return (valid is None or valid[1](v), len(votes[v]), prefer is not None and prefer(v))

    best, *rest = sorted(votes, key=rank, reverse=True)
    tie = bool(rest) and rank(rest[0]) == rank(best)
    if tie or not rank(best)[0]:
        shown = [f"{name(k)!r} is {s[k]}" for v in [best, *rest] for k in votes[v]]
        why = "tensors disagree and no majority shows which is wrong" if tie else f"it must be {valid[0]}"
        raise CheckpointError(f"{where}: cannot detect {size} ({why}): {', '.join(shown[:5])}"
                              + (f" (+{len(shown) - 5} more)" if len(shown) > 5 else ""))
    return best


def _detect(s: dict[str, tuple], where: str, name: Callable[[str], str]) -> tuple[dict, str]:
    """ComfyUI's Wan detection rules on original-named shapes -> (diffusers kwargs, variant).

    ``name`` turns an original key into the key as the file writes it, for errors.
    """
    need = ["head.modulation", "patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight"]
    absent = [name(k) for k in need if k not in s]
    if absent:
        raise CheckpointError(f"{where}: missing keys: {_first(absent)}")
    layers = _count(s, "blocks")

    def size(what, **kw):
        return _size(s, what, layers, where, name, **kw)

    dim = size("dim", valid=(f"a multiple of {HEAD_DIM}", lambda v: v > 0 and v % HEAD_DIM == 0))
    patch = size("patch_size", valid=("the 3 kernel sizes of a Conv3d", lambda v: len(v) == 3 and min(v) > 0))
    p = patch[0] * patch[1] * patch[2]
    in_dim = size("in_channels")
    out_dim = size("out_channels * patch volume",
                   valid=(f"a multiple of the patch volume {p}", lambda v: v > 0 and v % p == 0),
                   prefer=lambda v: v // p in _LATENT_CHANNELS) // p
    block_keys = [k for k in s if k.startswith("blocks.")]
    cfg: dict[str, Any] = dict(
        patch_size=patch, num_attention_heads=dim // HEAD_DIM, attention_head_dim=HEAD_DIM,
        in_channels=in_dim, out_channels=out_dim, text_dim=size("text_dim"), freq_dim=size("freq_dim"),
        ffn_dim=size("ffn_dim"), num_layers=layers,
        # a block that lacks these is then reported as missing them, not the others as unexpected
        cross_attn_norm=any(re.fullmatch(r"blocks\.\d+\.norm3\.(weight|bias)", k) for k in block_keys),
        qk_norm=("rms_norm_across_heads" if any(re.fullmatch(r"blocks\.\d+\.(self|cross)_attn\.norm_[qk]\.weight", k)
                                                for k in block_keys) else None),
        eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024, pos_embed_seq_len=None,
    )
    variant = "t2v"
    if any(k.startswith("img_emb.") for k in s):
        cfg.update(image_dim=size("image_dim"), added_kv_proj_dim=dim)
        variant = "i2v"
        if "img_emb.emb_pos" in s:
            cfg["pos_embed_seq_len"] = size("pos_embed_seq_len")
            variant = "flf2v"
    elif in_dim == 36:
        variant = "i2v"  # Wan 2.2 I2V-A14B: image latents in the input channels, no CLIP branch
    elif in_dim == out_dim == 48:
        variant = "ti2v_5b"  # Wan 2.2 TI2V-5B (dim 3072); rule keyed on channels so tiny tests match too
    if any(k.startswith("vace_") for k in s):
        n_vace = _count(s, "vace_blocks")
        if n_vace == 0 or n_vace > layers:
            raise CheckpointError(f"{where}: {n_vace} vace_blocks for {layers} blocks")
        # ComfyUI's rule (range(0, layers, layers // n_vace)): 1.3B 30/15 -> every 2nd; 14B 40/8 -> every 5th
        step = layers // n_vace
        cfg.update(vace_layers=[i * step for i in range(n_vace)], vace_in_channels=size("vace_in_channels"))
        variant = "vace"
    return cfg, variant


def _merge_config_json(cfg: dict, cj: dict, where: str) -> dict:
    """A diffusers config.json overrides what tensors cannot show; must agree on everything else."""
    cfg = dict(cfg)
    for k in ("eps", "rope_max_seq_len", "vace_layers", "qk_norm"):
        if k in cj and (k != "vace_layers" or "vace_layers" in cfg):
            cfg[k] = cj[k]
    for k, v in cfg.items():
        if k in cj and cj[k] is not None and k not in ("eps", "rope_max_seq_len", "vace_layers", "qk_norm"):
            if (tuple(cj[k]) if isinstance(cj[k], list) else cj[k]) != v:
                raise CheckpointError(f"{where}: config.json {k}={cj[k]!r} disagrees with the weights ({v!r})")
    return cfg


@functools.lru_cache(maxsize=16)
def _expected_shapes(cls_name: str, cfg_json: str) -> dict[str, tuple]:
    import diffusers  # lazy: only for validation

    cls = getattr(diffusers, cls_name)
    with torch.device("meta"):
        model = cls(**json.loads(cfg_json))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
def fp32_predicate(cls) -> Callable[[str], bool]:
    """Whether diffusers keeps a parameter of ``cls`` in fp32 (its ``_keep_in_fp32_modules``: rope,
    time embedder, modulation tables, norms): a name any dotted part of which is listed."""
    keep = set(getattr(cls, "_keep_in_fp32_modules", None) or ())
    return lambda name: any(part in keep for part in name.split("."))


def _dequant(w: torch.Tensor, scale: torch.Tensor | None, dtype) -> torch.Tensor:
    if scale is not None:
        scale = scale.to(torch.float32)
        if scale.numel() > 1 and w.ndim > 1:
            scale = scale.reshape(-1, *([1] * (w.ndim - 1)))
        w = w.to(torch.float32) * scale
        return w.to(dtype or torch.bfloat16)
    return w.to(dtype) if dtype is not None and w.dtype != dtype else w


def _read_header(path: str) -> dict[str, tuple[tuple, str]]:
    """Parse a safetensors header (8-byte length + JSON) without touching tensor data."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds file size {size}")
            header = json.loads(f.read(n))
        out, end = {}, 0
        for k, v in header.items():
            if k == "__metadata__":
                continue
            out[k] = (tuple(v["shape"]), _dtype_name(_SAFE_DTYPES.get(v["dtype"], v["dtype"])))
            end = max(end, v["data_offsets"][1])
        if 8 + n + end > size:
            raise ValueError(f"truncated: tensor data ends at byte {8 + n + end}, file has {size}")
        return out
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e


def _files(path) -> tuple[dict[str, str], dict[str, tuple[tuple, str]], dict | None]:
    """(key -> shard file, key -> (shape, dtype) from the headers, config.json of a folder or None)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        meta = _read_header(path)
        return {k: path for k in meta}, meta, None
    cfg_path = os.path.join(path, "config.json")
    config = None
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            config = json.load(f)
    idx = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors.index.json")]
    if idx:
        with open(os.path.join(path, idx[0])) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    if not shards:
        raise CheckpointError(f"{path}: folder has no *.safetensors files")
    files, meta = {}, {}
    for s in shards:
        head = _read_header(os.path.join(path, s))
        dup = set(head) & set(meta)
        if dup:
            raise CheckpointError(f"{path}: keys in more than one shard: {_first(dup)}")
        meta.update(head)
        files.update({k: os.path.join(path, s) for k in head})
    return files, meta, config


def read_header(path) -> dict[str, tuple[tuple, str]]:
    """Every key of ``path`` (file or diffusers folder) as written in the file -> (shape, dtype name),
    from the safetensors header(s) alone."""
    return _files(path)[1]


def inspect_checkpoint(path) -> CheckpointInfo:
    """Read only the safetensors header(s) of ``path`` (file or diffusers folder); detect and validate.

    Returns the same ``CheckpointInfo`` as ``load_checkpoint`` without reading any tensor data.
    Raises ``CheckpointError`` (a ``ValueError``) naming the file and offending keys on bad input.
    """
    _, meta, config = _files(path)
    return _plan(meta, path, config).info


def load_checkpoint(path, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Load a Wan transformer checkpoint (file or diffusers folder) under diffusers names.

    The header is read and validated first; tensors are then read one at a time (``safe_open``) and
    converted, so peak memory is the result plus one tensor.  ``dtype`` None keeps the stored dtype
    (plain float8 stays float8); scaled-fp8 weights are dequantised to ``dtype`` or bfloat16.
    Raises ``CheckpointError`` (a ``ValueError``) naming the file and offending keys on bad input.
    """
    info, tensors = iter_checkpoint(path, dtype)
    return dict(tensors), info


def iter_checkpoint(path, dtype: torch.dtype | None = None, only: Iterable[str] | None = None,
                    info: CheckpointInfo | None = None) -> tuple[CheckpointInfo, Iterator[tuple[str, torch.Tensor]]]:
    """Like ``load_checkpoint`` but streaming: ``(info, iterator of (diffusers name, tensor))``.

    The header is validated before this returns; each tensor is read from the memory-mapped file
    only when the iterator reaches it, so a caller that moves every tensor to its GPU (or casts it)
    as it arrives never holds more than one tensor in host memory beyond the shared page cache.
    ``only``: read just these diffusers names (e.g. to restore weights a LoRA had patched).
    ``info``: what ``inspect_checkpoint`` returned for this file; its validation is not repeated
    (the worker group's ranks stream a file the owner has already checked).
    """
    info, raw = iter_weights(path, only=only, info=info)
    return info, ((name, _dequant(w, s, dtype)) for name, w, s in raw)


def iter_weights(path, only: Iterable[str] | None = None, info: CheckpointInfo | None = None,
                 rows: Callable[[str, tuple], slice | None] | None = None
                 ) -> tuple[CheckpointInfo, Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]]:
    """The stored tensors, not dequantised: ``(info, iterator of (diffusers name, tensor as stored,
    scale or None))``; the scale is a scaled-fp8 weight's (the weight is ``tensor.float() * scale``).

    ``rows(name, shape)``: the rows (a slice of dim 0) of each tensor to read, or an index tuple of
    slices (e.g. ``(slice(None), columns)``), or None for all of it.
    Only those rows are read from the memory map (safetensors' ``get_slice``), and a per-row scale
    is sliced with them: a rank that holds 1/N of every tensor reads 1/N of the file.
    ``only`` and ``info`` as in ``iter_checkpoint``."""
    files, meta, config = _files(path)
    plan = _plan(meta, path, config, known=info)
    if only is not None:
        wanted = set(only)
        unknown = wanted - {dst for _, dst, _ in plan.items}
        if unknown:
            raise CheckpointError(f"{_where(path)}: no tensors named {_first(unknown)}")
        plan = dataclasses.replace(plan, items=[it for it in plan.items if it[1] in wanted])
    return plan.info, _stream(path, files, meta, plan, rows)


def stored_tensors(path, info: CheckpointInfo | None = None) -> dict[str, tuple[tuple, str, tuple | None]]:
    """diffusers name -> (shape, dtype name as stored, shape of its fp8 scale or None), from the
    header(s) alone: what a loader needs to decide how to hold each weight before reading any."""
    files, meta, config = _files(path)
    plan = _plan(meta, path, config, known=info)
    return {dst: (tuple(meta[src][0]), meta[src][1], tuple(meta[sk][0]) if sk else None) for src, dst, sk in plan.items}


def _stream(path, files, meta, plan, rows):
    from safetensors import safe_open

    handles: dict[str, Any] = {}

    def read(key, part):
        if files[key] not in handles:
            handles[files[key]] = safe_open(files[key], framework="pt", device="cpu")
        if part is None:
            return handles[files[key]].get_tensor(key)
        return handles[files[key]].get_slice(key)[part]

    try:
        for src, dst, scale_key in plan.items:
            shape = tuple(meta[src][0])
            part = rows(dst, shape) if rows is not None else None
            try:
                w = read(src, part)
                s = None
                if scale_key:
                    per_row = len(shape) > 0 and math.prod(meta[scale_key][0]) == shape[0] > 1
                    rows_part = part[0] if isinstance(part, tuple) else part  # a per-row scale goes with the rows
                    s = read(scale_key, rows_part if per_row and rows_part != slice(None) else None)
            except Exception as e:  # safetensors raises its own error types on corrupt data
                raise CheckpointError(f"{path}: failed reading tensor data ({type(e).__name__}: {e})") from e
            yield dst, w, s
    finally:
        handles.clear()


def convert_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None
                       ) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """In-memory version of ``load_checkpoint`` (``info.path`` is None).  The input is not modified."""
    meta = {k: (tuple(v.shape), _dtype_name(v.dtype)) for k, v in state_dict.items()}
    plan = _plan(meta, None)
    out = {dst: _dequant(state_dict[src], state_dict[sk] if sk else None, dtype) for src, dst, sk in plan.items}
    return out, plan.info


def to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names -> original Wan names (no prefix).  Unknown keys raise ``ValueError``."""
    out, bad = {}, []
    for k, v in state_dict.items():
        o = diffusers_to_original_key(k)
        if o is None:
            bad.append(k)
        else:
            out[o] = v
    if bad:
        raise CheckpointError(f"<state_dict>: keys with no original Wan name: {_first(bad)}")
    return out


# --------------------------------------------------------------------------------------------------
# LoRA
_LORA_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "model.")
_LORA_PARTS = {
    ".lora_up.weight": "up", ".lora_down.weight": "down", ".lora_B.weight": "up", ".lora_A.weight": "down",
    ".lora_B.default.weight": "up", ".lora_A.default.weight": "down", ".alpha": "alpha",
}


def _lora_target(module: str) -> str | None:
    """LoRA module name (original, diffusers, or kohya underscore form) -> diffusers target weight key."""
    if module.startswith("lora_unet_"):
        rest = module[len("lora_unet_"):]
        hits = []
        for rx, stem in _KOHYA:
            m = rx.fullmatch(rest)
            if m:
                hits.append(_fill(stem, m.group(1) if m.groups() else None))
        if len(hits) != 1:
            return None
        module = hits[0]
    for p in _LORA_PREFIXES:
        if module.startswith(p):
            module = module[len(p):]
            break
    d = original_to_diffusers_key(module + ".weight")
    if d is not None:
        return d
    if diffusers_to_original_key(module + ".weight") is not None:
        return module + ".weight"
    return None


def convert_lora(lora_state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """LoRA tensors (ComfyUI/kohya ``lora_up/lora_down/alpha``, ``lora_unet_*``, PEFT ``lora_A/lora_B``,
    with original or diffusers module names) -> ``{diffusers weight key: {"up", "down", "alpha"}}``.

    ``alpha`` is a float or None.  Unknown keys, or a module lacking up or down, raise ``ValueError``.
    """
    out: dict[str, dict[str, Any]] = {}
    bad = []
    for k, v in lora_state_dict.items():
        part = next((p for p in _LORA_PARTS if k.endswith(p)), None)
        target = _lora_target(k[: -len(part)]) if part else None
        if target is None:
            bad.append(k)
            continue
        e = out.setdefault(target, {"up": None, "down": None, "alpha": None})
        role = _LORA_PARTS[part]
        e[role] = float(v.float().item()) if role == "alpha" else v
    if bad:
        raise CheckpointError(f"<lora>: unknown LoRA keys: {_first(bad)}")
    incomplete = [t for t, e in out.items() if e["up"] is None or e["down"] is None]
    if incomplete:
        raise CheckpointError(f"<lora>: LoRA modules missing lora_up/lora_down: {_first(incomplete)}")
    return out


def lora_delta(entry: dict[str, Any], strength: float = 1.0) -> torch.Tensor:
    """``strength * (alpha / rank if alpha else 1) * up @ down`` in float32, shaped like the target weight
    (conv LoRAs: ``up [out, r, 1..]``, ``down [r, in, k..]`` -> ``[out, in, k..]``)."""
    up, down, alpha = entry["up"].float(), entry["down"].float(), entry.get("alpha")
    rank = down.shape[0]
    scale = strength * (alpha / rank if alpha else 1.0)
    delta = up.flatten(1) @ down.flatten(1)
    if down.ndim > 2:
        delta = delta.reshape(up.shape[0], *down.shape[1:])
    return delta * scale


# --------------------------------------------------------------------------------------------------
# The Wan VAE: ComfyUI's (= the original Wan repo's) state dict -> diffusers ``AutoencoderKLWan``.
#
# ComfyUI builds ``comfy.ldm.wan.vae.WanVAE`` (2.1) or ``vae2_2.WanVAE`` (2.2) from the state dict
# with fixed ``dim_mult [1, 2, 4, 4]``, ``num_res_blocks 2``, no attention outside the mid-blocks;
# so does this table. Conversion is rename-only (every tensor keeps its shape); ``vae_to_diffusers``
# checks names and shapes against the diffusers class built on the meta device.
VAE_DIM_MULT = (1, 2, 4, 4)
VAE_NUM_RES_BLOCKS = 2

# Whole prefixes that rename as they are.
VAE_PREFIX_RULES = [
    ("conv1.", "quant_conv."),
    ("conv2.", "post_quant_conv."),
    ("encoder.conv1.", "encoder.conv_in."),
    ("decoder.conv1.", "decoder.conv_in."),
    ("encoder.head.0.", "encoder.norm_out."),
    ("encoder.head.2.", "encoder.conv_out."),
    ("decoder.head.0.", "decoder.norm_out."),
    ("decoder.head.2.", "decoder.conv_out."),
    ("encoder.middle.0.", "encoder.mid_block.resnets.0."),
    ("encoder.middle.1.", "encoder.mid_block.attentions.0."),  # norm, to_qkv, proj: same names
    ("encoder.middle.2.", "encoder.mid_block.resnets.1."),
    ("decoder.middle.0.", "decoder.mid_block.resnets.0."),
    ("decoder.middle.1.", "decoder.mid_block.attentions.0."),
    ("decoder.middle.2.", "decoder.mid_block.resnets.1."),
]
# Inside a residual block (ComfyUI's nn.Sequential indices -> diffusers' attributes). Resample
# blocks keep their names (``resample.1``, ``time_conv``).
VAE_RESBLOCK_RULES = [
    ("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."), ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
]
# Where the down/up-sampling blocks go, per VAE ("2.1": flat lists; "2.2": one residual block per
# level), as (ComfyUI prefix template, diffusers prefix template, kind): {i} level, {k} block within
# it, {j} flat index. Kind says which blocks a level has: "res" (k < num_res_blocks [+1 in the
# decoder]) or "resample" (the last one, on every level but the last).
VAE_BLOCK_LAYOUT = {
    "2.1": {
        "encoder": ("encoder.downsamples.{j}.", {"res": "encoder.down_blocks.{j}.", "resample": "encoder.down_blocks.{j}."}),
        "decoder": ("decoder.upsamples.{j}.", {"res": "decoder.up_blocks.{i}.resnets.{k}.",
                                              "resample": "decoder.up_blocks.{i}.upsamplers.0."}),
    },
    "2.2": {
        "encoder": ("encoder.downsamples.{i}.downsamples.{k}.", {"res": "encoder.down_blocks.{i}.resnets.{k}.",
                                                                 "resample": "encoder.down_blocks.{i}.downsampler."}),
        "decoder": ("decoder.upsamples.{i}.upsamples.{k}.", {"res": "decoder.up_blocks.{i}.resnets.{k}.",
                                                             "resample": "decoder.up_blocks.{i}.upsampler."}),
    },
}


@dataclasses.dataclass(frozen=True)
class VaeInfo:
    """What a Wan VAE state dict is: ``version`` "2.1" (z 16, 8x) or "2.2" (z 48, 16x with the 2x2
    patchify), and the diffusers ``AutoencoderKLWan`` config that holds it."""

    version: str
    diffusers_config: dict
    z_dim: int
    spatial: int  # pixels per latent row/column: 8 (2.1) or 16 (2.2)
    temporal: int = 4  # frames per latent frame after the first


def _vae_prefixes(version: str) -> list[tuple[str, str]]:
    """(ComfyUI prefix, diffusers prefix) of every down/up-sampling block of a ``version`` VAE."""
    levels = len(VAE_DIM_MULT)
    out = []
    for part, extra in (("encoder", 0), ("decoder", 1)):  # the decoder has one more res block per level
        src, dst = VAE_BLOCK_LAYOUT[version][part]
        j = 0
        for i in range(levels):
            kinds = ["res"] * (VAE_NUM_RES_BLOCKS + extra) + (["resample"] if i != levels - 1 else [])
            for k, kind in enumerate(kinds):
                out.append((src.format(i=i, k=k, j=j), dst[kind].format(i=i, k=k, j=j)))
                j += 1
    return out


@functools.lru_cache(maxsize=None)
def _vae_table(version: str) -> list[tuple[str, str]]:
    return sorted(VAE_PREFIX_RULES + _vae_prefixes(version), key=lambda r: -len(r[0]))  # longest prefix first


def vae_key_to_diffusers(key: str, version: str) -> str | None:
    for src, dst in _vae_table(version):
        if key.startswith(src):
            rest = key[len(src):]
            for a, b in VAE_RESBLOCK_RULES:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            return dst + rest
    return None


def _vae_shape(sd, key: str) -> tuple:
    v = sd[key]
    return tuple(v.shape if hasattr(v, "shape") else v)


def inspect_vae(state_dict: dict) -> VaeInfo:
    """The Wan VAE ``state_dict`` (ComfyUI's names; tensors or shapes) holds, by ComfyUI's own rules
    (comfy/sd.py: a Wan VAE has ``decoder.middle.0.residual.0.gamma``; 2.2 has nested up-blocks).
    Raises CheckpointError for anything else."""
    if "decoder.middle.0.residual.0.gamma" not in state_dict or "encoder.conv1.weight" not in state_dict:
        raise CheckpointError("not a Wan VAE (no decoder.middle.0.residual.0.gamma / encoder.conv1.weight): the "
                              "XDit+USP VAE nodes take the Wan 2.1 or Wan 2.2 VAE")
    version = "2.2" if "decoder.upsamples.0.upsamples.0.residual.2.weight" in state_dict else "2.1"
    enc_in = _vae_shape(state_dict, "encoder.conv1.weight")  # [base_dim, in_channels, 3, 3, 3]
    z_dim = _vae_shape(state_dict, "decoder.conv1.weight")[1]
    cfg = dict(base_dim=enc_in[0], decoder_base_dim=_vae_shape(state_dict, "decoder.head.0.gamma")[0],
               z_dim=z_dim, dim_mult=list(VAE_DIM_MULT), num_res_blocks=VAE_NUM_RES_BLOCKS, attn_scales=[],
               temperal_downsample=[False, True, True], in_channels=enc_in[1],
               out_channels=_vae_shape(state_dict, "decoder.head.2.weight")[0])
    if version == "2.2":
        cfg.update(is_residual=True, patch_size=2, scale_factor_spatial=16,
                   latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)  # not used by encode/decode
    else:
        cfg.update(latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    return VaeInfo(version, cfg, z_dim, 16 if version == "2.2" else 8)


@functools.lru_cache(maxsize=8)
def _vae_expected(cfg_json: str) -> dict[str, tuple]:
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        m = diffusers.AutoencoderKLWan(**json.loads(cfg_json))
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def vae_to_diffusers(state_dict: dict, info: VaeInfo | None = None) -> tuple[dict, VaeInfo]:
    """ComfyUI's Wan VAE state dict -> ({diffusers name: the same tensor}, VaeInfo), every name and
    shape checked against ``AutoencoderKLWan`` (CheckpointError naming what does not fit)."""
    info = info or inspect_vae(state_dict)
    expected = _vae_expected(json.dumps(info.diffusers_config, sort_keys=True))
    out, unknown, bad = {}, [], {}
    for k, v in state_dict.items():
        name = vae_key_to_diffusers(k, info.version)
        if name is None or name not in expected:
            unknown.append(k)
        elif tuple(v.shape) != expected[name]:
            bad[name] = f"{k} is {tuple(v.shape)}, expected {expected[name]}"
        else:
            out[name] = v
    missing = sorted(set(expected) - set(out) - set(bad))
    if unknown or bad or missing:
        shapes = sorted(bad.values())
        raise CheckpointError(
            f"Wan {info.version} VAE state dict does not match diffusers' AutoencoderKLWan: "
            + "; ".join(p for p in (unknown and f"unknown keys {_first(unknown)}",
                                    bad and "shapes: " + ", ".join(shapes[:5]) + (" ..." if len(shapes) > 5 else ""),
                                    missing and f"missing {_first(missing)}") if p))
    return out, info


def vae_key_to_original(name: str, version: str) -> str | None:
    """The inverse of ``vae_key_to_diffusers`` (diffusers name -> ComfyUI's)."""
    for src, dst in sorted(_vae_table(version), key=lambda r: -len(r[1])):
        if name.startswith(dst):
            rest = name[len(dst):]
            for a, b in VAE_RESBLOCK_RULES:
                if rest.startswith(b):
                    rest = a + rest[len(b):]
                    break
            return src + rest
    return None


def vae_to_original(state_dict: dict, version: str) -> dict:
    """diffusers ``AutoencoderKLWan`` state dict -> ComfyUI's names (what a Wan VAE file holds)."""
    return {vae_key_to_original(k, version): v for k, v in state_dict.items()}
