"""wan_to_xdit_mapping: tiny real diffusers models, CPU, no downloads."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from comfyui_xdit_usp import wan_to_xdit_mapping as M
from comfyui_xdit_usp.parallel import tiny
from comfyui_xdit_usp.parallel.tiny import VARIANTS
from workflow_utils import ENTRY


@pytest.fixture(scope="module")
def models():
    return {v: tiny.build_model(v, seed=i) for i, v in enumerate(VARIANTS)}


# ---------------------------------------------------------------------------------------------- table
def test_table_is_a_bijection():
    origs = [o for o, _ in M.RULES]
    diffs = [d for _, d in M.RULES]
    assert len(set(origs)) == len(origs) and len(set(diffs)) == len(diffs)
    for o, d in M.RULES:
        for suffix in ("", ".weight", ".bias"):
            ok, dk = o.replace("{N}", "7") + suffix, d.replace("{N}", "7") + suffix
            assert M.original_to_diffusers_key(ok) == dk
            assert M.diffusers_to_original_key(dk) == ok


def test_import_needs_no_diffusers_comfy_or_yunchang():
    code = ("import runpy, sys; runpy.run_path(%r)['bind_package'](run_init=False); "
            "import comfyui_xdit_usp.wan_to_xdit_mapping; "
            "print(sorted(m for m in ('diffusers', 'comfy', 'yunchang') if m in sys.modules))" % ENTRY)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stderr


# ---------------------------------------------------------------------------------------- variants
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_roundtrip_from_file(variant, models, tmp_path):
    model = models[variant]
    path = tiny.write_original_checkpoint(model, tmp_path / f"{variant}.safetensors")
    sd, info = M.load_checkpoint(path)
    assert info.variant == variant and info.format == "original" and info.path == str(path)
    assert info.diffusers_class == type(model).__name__
    assert info.diffusers_config == tiny.tiny_config(variant)
    assert (info.dim, info.num_heads, info.num_layers) == (256, 2, 2)
    assert info.source_dtype == "float32"
    cls = tiny.model_class(variant)
    fresh = cls(**info.diffusers_config)
    assert set(sd) == set(fresh.state_dict())
    fresh.load_state_dict(sd, strict=True)
    fresh.eval()
    inputs = tiny.random_inputs(variant, batch=1, latent_frames=2, latent_h=8, latent_w=8)
    ref, got = tiny.reference_forward(model, inputs), tiny.reference_forward(fresh, inputs)
    assert torch.allclose(ref, got, atol=1e-6, rtol=0), (ref - got).abs().max()
    assert M.inspect_checkpoint(path) == info


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_diffusers_single_file_converter(variant, models):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    orig = tiny.original_state_dict(models[variant])
    ours, _ = M.convert_state_dict(orig)
    theirs = convert_wan_transformer_to_diffusers(dict(orig))
    if variant == "flf2v":  # diffusers' converter leaves img_emb.emb_pos unconverted
        assert theirs.pop("img_emb.emb_pos") is not None
        ours = dict(ours)
        ours.pop("condition_embedder.image_embedder.pos_embed")
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("variant", VARIANTS)
def test_original_diffusers_original_identity(variant, models):
    orig = tiny.original_state_dict(models[variant])
    conv, _ = M.convert_state_dict(orig)
    back = M.to_original(conv)
    assert set(back) == set(orig)
    assert all(torch.equal(back[k], orig[k]) for k in orig)


@pytest.mark.parametrize("prefix,fmt", [("", "original"), ("model.diffusion_model.", "comfyui"),
                                        ("diffusion_model.", "comfyui"), ("model.", "comfyui")])
def test_prefixes(prefix, fmt, models, tmp_path):
    path = tiny.write_original_checkpoint(models["t2v"], tmp_path / "p.safetensors", prefix=prefix)
    sd, info = M.load_checkpoint(path)
    assert info.format == fmt and info.prefix == prefix
    assert set(sd) == set(models["t2v"].state_dict())


def test_diffusers_single_file_and_folder(models, tmp_path):
    model = models["vace"]
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "d.safetensors"))
    got, info = M.load_checkpoint(tmp_path / "d.safetensors")
    assert info.format == "diffusers" and info.variant == "vace"
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    # folder: config.json + 2 shards + index
    folder = tmp_path / "transformer"
    folder.mkdir()
    keys = sorted(sd)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(folder / name))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    model.save_config(str(folder))  # writes config.json
    got, info = M.load_checkpoint(folder, dtype=torch.bfloat16)
    assert info.format == "diffusers" and info.diffusers_config["vace_layers"] == [0]
    assert set(got) == set(sd) and all(got[k].dtype == torch.bfloat16 for k in got)
    assert M.inspect_checkpoint(folder) == info
    # a config.json that disagrees with the weights is refused
    cfg = json.loads((folder / "config.json").read_text())
    cfg["ffn_dim"] = 1024
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="ffn_dim"):
        M.inspect_checkpoint(folder)


def _meta_original_state_dict(cls_name, **cfg):
    """A real-size model's state dict under original names, on the meta device (shapes only)."""
    import diffusers

    with torch.device("meta"):
        m = getattr(diffusers, cls_name)(**cfg)
    return {M.diffusers_to_original_key(k): v.to(torch.bfloat16) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name,cls,cfg,variant,n_keys", [
    ("1.3B t2v", "WanTransformer3DModel", dict(num_attention_heads=12, num_layers=30, ffn_dim=8960), "t2v", 825),
    ("14B t2v", "WanTransformer3DModel", dict(), "t2v", None),
    ("14B i2v", "WanTransformer3DModel", dict(in_channels=36, image_dim=1280, added_kv_proj_dim=5120), "i2v", None),
    ("14B flf2v", "WanTransformer3DModel",
     dict(in_channels=36, image_dim=1280, added_kv_proj_dim=5120, pos_embed_seq_len=514), "flf2v", None),
    ("2.2 i2v A14B", "WanTransformer3DModel", dict(in_channels=36), "i2v", None),
    ("5B", "WanTransformer3DModel",
     dict(num_attention_heads=24, num_layers=30, ffn_dim=14336, in_channels=48, out_channels=48), "ti2v_5b", None),
    ("vace 1.3B", "WanVACETransformer3DModel", dict(num_attention_heads=12, num_layers=30, ffn_dim=8960,
                                                  vace_layers=list(range(0, 30, 2))), "vace", None),
    ("vace 14B", "WanVACETransformer3DModel", dict(vace_layers=[0, 5, 10, 15, 20, 25, 30, 35]), "vace", None),
])
def test_real_size_detection_from_shapes_only(name, cls, cfg, variant, n_keys):
    _, info = M.convert_state_dict(_meta_original_state_dict(cls, **cfg))
    assert info.variant == variant and info.diffusers_class == cls
    for k, v in cfg.items():
        assert info.diffusers_config[k] == v, k
    if n_keys:
        assert info.num_tensors == n_keys


# -------------------------------------------------------------------------------------------- LoRA
def _lora_pair(out_f, in_f, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, r, generator=g), torch.randn(r, in_f, generator=g)


def test_lora_styles(models):
    target_sd = models["i2v"].state_dict()
    up, down = _lora_pair(256, 256)
    cases = {
        "blocks.0.attn1.to_q.weight": [
            {"diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
             "diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
             "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(2.0)},
            {"lora_unet_blocks_0_self_attn_q.lora_up.weight": up, "lora_unet_blocks_0_self_attn_q.lora_down.weight": down,
             "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(2.0)},
            {"blocks.0.self_attn.q.lora_B.weight": up, "blocks.0.self_attn.q.lora_A.weight": down,
             "blocks.0.self_attn.q.alpha": torch.tensor(2.0)},
            {"transformer.blocks.0.attn1.to_q.lora_B.weight": up, "transformer.blocks.0.attn1.to_q.lora_A.weight": down,
             "transformer.blocks.0.attn1.to_q.alpha": torch.tensor(2.0)},
        ],
        # underscore-ambiguous names resolve against the original patterns
        "blocks.1.attn2.add_k_proj.weight": [
            {"lora_unet_blocks_1_cross_attn_k_img.lora_up.weight": up,
             "lora_unet_blocks_1_cross_attn_k_img.lora_down.weight": down,
             "lora_unet_blocks_1_cross_attn_k_img.alpha": torch.tensor(2.0)}],
        "blocks.1.ffn.net.0.proj.weight": [
            {"diffusion_model.blocks.1.ffn.0.lora_A.weight": down[:, :256], "diffusion_model.blocks.1.ffn.0.lora_B.weight":
             torch.randn(512, 4), "diffusion_model.blocks.1.ffn.0.alpha": torch.tensor(2.0)}],
        "condition_embedder.time_proj.weight": [
            {"lora_unet_time_projection_1.lora_up.weight": torch.randn(1536, 4),
             "lora_unet_time_projection_1.lora_down.weight": down, "lora_unet_time_projection_1.alpha": torch.tensor(2.0)}],
    }
    for target, styles in cases.items():
        for lora in styles:
            conv = M.convert_lora(lora)
            assert list(conv) == [target], (lora.keys(), conv.keys())
            e = conv[target]
            assert e["alpha"] == 2.0
            d = M.lora_delta(e, 0.5)
            assert target in target_sd and d.shape == target_sd[target].shape
            manual = 0.5 * (2.0 / 4) * (e["up"].float() @ e["down"].float())
            assert torch.allclose(d, manual)


def test_lora_no_alpha_and_conv():
    up = torch.randn(256, 2, 1, 1, 1)
    down = torch.randn(2, 16, 1, 2, 2)
    conv = M.convert_lora({"diffusion_model.patch_embedding.lora_up.weight": up,
                           "diffusion_model.patch_embedding.lora_down.weight": down})
    e = conv["patch_embedding.weight"]
    assert e["alpha"] is None
    d = M.lora_delta(e, 1.5)
    assert d.shape == (256, 16, 1, 2, 2)
    assert torch.allclose(d, 1.5 * (up.flatten(1) @ down.flatten(1)).reshape(256, 16, 1, 2, 2))


def test_lora_unknown_keys_and_incomplete():
    with pytest.raises(ValueError, match="lora_unet_input_blocks_1_0_emb_layers_1"):
        M.convert_lora({"lora_unet_input_blocks_1_0_emb_layers_1.lora_up.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="blocks.0.self_attn.q.diff"):
        M.convert_lora({"diffusion_model.blocks.0.self_attn.q.diff": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="missing"):
        M.convert_lora({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(2, 2)})


# --------------------------------------------------------------------------------------------- fp8
FP8 = torch.float8_e4m3fn


def test_plain_fp8(models, tmp_path):
    orig = tiny.original_state_dict(models["t2v"])
    fp8 = {k: (v.to(FP8) if v.ndim >= 2 and not k.endswith("modulation") else v) for k, v in orig.items()}
    path = tmp_path / "fp8.safetensors"
    save_file(fp8, str(path))
    sd, info = M.load_checkpoint(path)
    assert info.source_dtype == "float8_e4m3fn" and not info.scaled_fp8
    q = "blocks.0.attn1.to_q.weight"
    assert sd[q].dtype == FP8 and torch.equal(sd[q].view(torch.uint8), fp8["blocks.0.self_attn.q.weight"].view(torch.uint8))
    sd16, _ = M.load_checkpoint(path, dtype=torch.bfloat16)
    assert sd16[q].dtype == torch.bfloat16
    assert torch.equal(sd16[q], fp8["blocks.0.self_attn.q.weight"].to(torch.bfloat16))


@pytest.mark.parametrize("spelling", ["scale_weight", "weight_scale"])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_scaled_fp8(spelling, prefix, models, tmp_path):
    orig = tiny.original_state_dict(models["t2v"])
    sdq, ref = {"scaled_fp8": torch.zeros(2, dtype=FP8)}, {}
    for i, (k, v) in enumerate(orig.items()):
        if k.endswith(".weight") and v.ndim == 2:
            mod = k[: -len(".weight")]
            scale = torch.tensor(v.abs().max().item() / 448.0) if i % 2 else v.abs().amax(1) / 448.0
            q = (v / (scale if scale.ndim == 0 else scale[:, None])).to(FP8)
            sdq[prefix + k] = q
            sdq[prefix + mod + "." + spelling] = scale
            sdq[prefix + mod + ".input_scale"] = torch.tensor(1.0)
            ref[k] = q.float() * (scale if scale.ndim == 0 else scale[:, None])
        else:
            sdq[prefix + k] = v.to(torch.bfloat16)
            ref[k] = v.to(torch.bfloat16)
    path = tmp_path / "scaled.safetensors"
    save_file(sdq, str(path))
    for dtype, want in [(None, torch.bfloat16), (torch.float32, torch.float32)]:
        sd, info = M.load_checkpoint(path, dtype=dtype)
        assert info.scaled_fp8 and info.source_dtype == "float8_e4m3fn"
        assert set(sd) == set(models["t2v"].state_dict())
        for k, v in ref.items():
            d = M.original_to_diffusers_key(k)
            if v.dtype == torch.bfloat16 and dtype is None:
                assert torch.equal(sd[d], v)
            else:
                assert sd[d].dtype == want and torch.equal(sd[d], v.to(want)), k
    mem, info = M.convert_state_dict(sdq)
    assert info.scaled_fp8 and info.path is None and mem["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16


# --------------------------------------------------------------------------------------- bad input
def _save(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def test_bad_unknown_layout_and_not_wan(tmp_path):
    p = _save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4),
               "model.diffusion_model.out.2.weight": torch.zeros(4)}, tmp_path / "sd15.safetensors")
    with pytest.raises(ValueError, match=r"sd15\.safetensors.*input_blocks\.0\.0\.weight"):
        M.load_checkpoint(p)
    p = _save({"blocks.0.self_attn.q.weight": torch.zeros(256, 256)}, tmp_path / "nohead.safetensors")
    with pytest.raises(ValueError, match=r"nohead\.safetensors.*head\.modulation"):
        M.load_checkpoint(p)


def test_bad_missing_unexpected_shape(models, tmp_path):
    orig = tiny.original_state_dict(models["t2v"])
    missing = dict(orig)
    del missing["blocks.1.cross_attn.k.weight"]
    with pytest.raises(ValueError, match=r"missing\.safetensors.*missing keys.*'blocks\.1\.cross_attn\.k\.weight'"):
        M.load_checkpoint(_save(missing, tmp_path / "missing.safetensors"))
    extra = dict(orig, **{"blocks.0.self_attn.q.lora_up.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"extra\.safetensors.*blocks\.0\.self_attn\.q\.lora_up\.weight"):
        M.load_checkpoint(_save(extra, tmp_path / "extra.safetensors"))
    extra2 = dict(orig, **{"blocks.0.modulation.bias": torch.zeros(2)})  # matches a rule, not in the model
    with pytest.raises(ValueError, match=r"extra2\.safetensors.*unexpected.*'blocks\.0\.modulation\.bias'"):
        M.load_checkpoint(_save(extra2, tmp_path / "extra2.safetensors"))
    shape = dict(orig, **{"blocks.1.ffn.2.weight": torch.zeros(256, 500)})
    with pytest.raises(ValueError, match=r"shape\.safetensors.*wrong shapes.*'blocks\.1\.ffn\.2\.weight'"):
        M.load_checkpoint(_save(shape, tmp_path / "shape.safetensors"))
    mixed = {("model.diffusion_model." + k if i else k): v for i, (k, v) in enumerate(orig.items())}
    with pytest.raises(ValueError, match="mixed key prefixes"):
        M.load_checkpoint(_save(mixed, tmp_path / "mixed.safetensors"))
    with pytest.raises(ValueError, match="<state_dict>.*missing keys"):
        M.convert_state_dict(missing)


# ------------------------------------------------------------------- errors name the keys of the file
# Every layout a user may hand us: original names, the same with ComfyUI's prefix, diffusers names.
LAYOUTS = ("original", "comfyui", "diffusers")


def _in_layout(model, layout):
    """(the model's tensors as a file of ``layout`` names them, original key -> that file's key)."""
    if layout == "diffusers":
        return {k: v.contiguous().clone() for k, v in model.state_dict().items()}, M.original_to_diffusers_key
    prefix = "model.diffusion_model." if layout == "comfyui" else ""
    return tiny.original_state_dict(model, prefix), lambda k: prefix + k


def _refused(sd, path) -> str:
    """The CheckpointError message for ``sd`` saved at ``path``: the same from the header alone and
    from a load, and naming the file."""
    p = _save(sd, path)
    with pytest.raises(M.CheckpointError) as inspected:
        M.inspect_checkpoint(p)
    with pytest.raises(M.CheckpointError) as loaded:
        M.load_checkpoint(p)
    msg = str(inspected.value)
    assert isinstance(inspected.value, ValueError) and str(loaded.value) == msg and msg.startswith(p + ": ")
    return msg


def _named(msg, keys) -> set:
    """The keys among ``keys`` that ``msg`` names (quoted, as errors write keys)."""
    return {k for k in keys if repr(k) in msg}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant,key,shape", [
    ("t2v", "blocks.0.ffn.0.weight", (514, 256)),  # the tensor ComfyUI reads ffn_dim from
    ("t2v", "blocks.0.ffn.0.weight", (1024, 256)),
    ("t2v", "blocks.0.ffn.0.weight", (512, 384)),
    ("t2v", "head.head.weight", (128, 256)),  # ... and out_channels from (here 32 instead of 16)
    ("t2v", "head.head.weight", (66, 256)),
    ("t2v", "head.head.weight", (64, 384)),
    ("t2v", "head.head.bias", (32,)),
    ("t2v", "head.modulation", (1, 2, 384)),  # ... and dim from
    ("t2v", "blocks.1.ffn.2.weight", (256, 500)),
    ("t2v", "blocks.1.self_attn.q.weight", (384, 256)),
    ("i2v", "img_emb.proj.0.bias", (80,)),  # ... and image_dim from
    ("flf2v", "img_emb.emb_pos", (1, 8, 80)),
    ("vace", "vace_blocks.0.before_proj.weight", (256, 384)),
])
def test_wrong_shape_names_that_tensor_only(layout, variant, key, shape, models, tmp_path):
    sd, in_file = _in_layout(models[variant], layout)
    k = in_file(key)
    good = tuple(sd[k].shape)
    sd[k] = torch.zeros(shape)
    msg = _refused(sd, tmp_path / "bad_shape.safetensors")
    assert f"wrong shapes: {k!r} is {shape}, expected {good}" in msg
    assert _named(msg, sd) == {k}, msg


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shapes_that_disagree_evenly_are_both_named(layout, models, tmp_path):
    # head.head.weight says 48 output channels, head.head.bias 16: both real Wan sizes, nothing to choose by
    sd, in_file = _in_layout(models["t2v"], layout)
    w, b = in_file("head.head.weight"), in_file("head.head.bias")
    sd[w] = torch.zeros(192, 256)
    msg = _refused(sd, tmp_path / "tie.safetensors")
    assert "cannot detect out_channels" in msg and f"{w!r} is (192, 256)" in msg and f"{b!r} is (64,)" in msg
    assert _named(msg, sd) == {w, b}, msg


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant,key", [
    ("t2v", "blocks.1.cross_attn.k.weight"),
    ("t2v", "blocks.0.ffn.0.weight"),
    ("t2v", "head.head.bias"),
    ("t2v", "blocks.0.norm3.weight"),  # its presence sets cross_attn_norm
    ("t2v", "blocks.1.self_attn.norm_q.weight"),  # ... and qk_norm
    ("t2v", "head.modulation"),
    ("i2v", "img_emb.proj.0.bias"),
    ("vace", "vace_blocks.0.after_proj.bias"),
])
def test_missing_key_named_as_in_the_file(layout, variant, key, models, tmp_path):
    sd, in_file = _in_layout(models[variant], layout)
    k = in_file(key)
    del sd[k]
    msg = _refused(sd, tmp_path / "missing.safetensors")
    assert "missing" in msg and _named(msg, [k, *sd]) == {k}, msg


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unexpected_key_named_as_in_the_file(layout, models, tmp_path):
    sd, in_file = _in_layout(models["t2v"], layout)
    k = in_file("blocks.0.modulation") + ".bias"  # a name the table converts, that the model lacks
    sd[k] = torch.zeros(2)
    msg = _refused(sd, tmp_path / "unexpected.safetensors")
    assert "unexpected keys" in msg and _named(msg, sd) == {k}, msg


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("key,dtype", [
    ("blocks.0.ffn.0.weight", torch.int64), ("head.head.bias", torch.int32),
    ("blocks.1.modulation", torch.uint8), ("blocks.0.norm3.weight", torch.bool),
])
def test_non_float_tensor_refused(layout, key, dtype, models, tmp_path):
    sd, in_file = _in_layout(models["t2v"], layout)
    k = in_file(key)
    sd[k] = sd[k].to(dtype)
    msg = _refused(sd, tmp_path / "ints.safetensors")
    assert f"not floating point (Wan weights are bf16/fp16/fp32/fp8): {k!r} ({str(dtype)[6:]})" in msg, msg
    assert _named(msg, sd) == {k}, msg
    with pytest.raises(M.CheckpointError, match="<state_dict>: tensors that are not floating point"):
        M.convert_state_dict(sd)


def test_bad_truncated_and_corrupt(models, tmp_path):
    p = tiny.write_original_checkpoint(models["t2v"], tmp_path / "trunc.safetensors")
    data = open(p, "rb").read()
    for cut, name in [(len(data) - 100, "trunc.safetensors"), (20, "short.safetensors"), (4, "tiny.safetensors")]:
        q = tmp_path / name
        q.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            M.load_checkpoint(q)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            M.inspect_checkpoint(q)
    q = tmp_path / "garbage.safetensors"
    q.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match=r"garbage\.safetensors"):
        M.load_checkpoint(q)


def test_bad_nonexistent(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.safetensors"):
        M.load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match=r"empty_dir"):
        (tmp_path / "empty_dir").mkdir()
        M.inspect_checkpoint(tmp_path / "empty_dir")


def test_inspect_reads_no_tensor_data(models, tmp_path, monkeypatch):
    p = tiny.write_original_checkpoint(models["flf2v"], tmp_path / "flf.safetensors", prefix="model.diffusion_model.")
    _, full = M.load_checkpoint(p)
    import safetensors
    import safetensors.torch

    def boom(*a, **k):
        raise AssertionError("tensor data read")

    monkeypatch.setattr(safetensors, "safe_open", boom)
    monkeypatch.setattr(safetensors.torch, "load_file", boom)
    monkeypatch.setattr(torch, "load", boom)
    info = M.inspect_checkpoint(p)
    assert info == full and info.variant == "flf2v" and info.format == "comfyui"
    assert info.diffusers_config["pos_embed_seq_len"] == 2 * tiny.IMAGE_TOKENS


def test_iter_checkpoint_reads_only_the_named_tensors(models, tmp_path):
    path = tiny.write_original_checkpoint(models["t2v"], tmp_path / "t2v.safetensors", prefix="model.diffusion_model.")
    wanted = {"blocks.1.ffn.net.0.proj.weight", "condition_embedder.time_proj.bias"}
    info, tensors = M.iter_checkpoint(path, only=wanted)
    got = dict(tensors)
    assert info.variant == "t2v" and set(got) == wanted
    sd = models["t2v"].state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in wanted)
    with pytest.raises(ValueError, match="no tensors named.*blocks.9.attn1.to_q.weight"):
        M.iter_checkpoint(path, only={"blocks.9.attn1.to_q.weight"})
