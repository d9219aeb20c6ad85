"""Node definitions and the example workflow; runs without ComfyUI (CI). With COMFYUI_DIR set and
ComfyUI importable, the workflow's native node types are also checked against ComfyUI's own."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workflow_utils as W  # noqa: E402

pack = W.load_pack()
NODES = pack.NODE_CLASS_MAPPINGS


def test_import_without_comfyui_imports_no_comfy():
    code = (
        "import sys; sys.path.insert(0, %r); import workflow_utils as W; p = W.load_pack(); "
        "assert set(p.NODE_CLASS_MAPPINGS) == W.OUR_TYPES, p.NODE_CLASS_MAPPINGS; "
        "bad = [m for m in ('comfy', 'folder_paths', 'nodes', 'diffusers') if m in sys.modules]; "
        "assert not bad, bad; print('ok')"
    ) % os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_mappings():
    assert set(NODES) == W.OUR_TYPES
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(NODES)
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["XDitUSPConfigNode"] == "XDit+USP Config"
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["XDitUSPWanVideoModelLoader"] == "XDit+USP WanVideo Model Loader"


@pytest.mark.parametrize("name", sorted(W.OUR_TYPES))
def test_node_class_contract(name):
    cls = NODES[name]
    it = cls.INPUT_TYPES()
    assert isinstance(it, dict) and "required" in it and set(it) <= {"required", "optional", "hidden"}
    for section in ("required", "optional"):
        for inp, spec in it.get(section, {}).items():
            assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, (inp, spec)
            assert isinstance(spec[0], (str, list)), (inp, spec)
            if len(spec) == 2:
                assert isinstance(spec[1], dict)
                opts = spec[1]
                if isinstance(spec[0], list) and "default" in opts:
                    assert opts["default"] in spec[0]
                if spec[0] in ("INT", "FLOAT") and "default" in opts:
                    assert opts.get("min", -1e30) <= opts["default"] <= opts.get("max", 1e30)
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    assert callable(getattr(cls, cls.FUNCTION))
    assert cls.CATEGORY == "WanVideo/xDiT-USP"
    # the function takes exactly the declared inputs
    import inspect

    params = set(inspect.signature(getattr(cls, cls.FUNCTION)).parameters) - {"self"}
    assert params == set(it["required"]) | set(it.get("optional", {}))


def test_config_node_builds_and_validates():
    node = NODES["XDitUSPConfigNode"]()
    (cfg,) = node.create(gpus=2, ulysses_degree=0, ring_degree=0, cfg_degree=0, dtype="fp32",
                         attention_backend="auto", gpu_memory_fraction=1.0, device="cpu")
    assert cfg.world_size == 2 and cfg.device == "cpu" and cfg.dtype == "fp32"
    assert str(cfg.resolve(2)) == "cfg2xulysses1xring1"
    with pytest.raises(ValueError, match="Degrees that multiply to 4"):
        node.create(gpus=4, ulysses_degree=3, ring_degree=0, cfg_degree=0, dtype="bf16",
                    attention_backend="auto", gpu_memory_fraction=1.0, device="cpu")
    with pytest.raises(ValueError, match="gpu_memory_fraction"):
        node.create(gpus=1, ulysses_degree=0, ring_degree=0, cfg_degree=0, dtype="bf16",
                    attention_backend="auto", gpu_memory_fraction=1.5, device="cpu")
    import torch

    if torch.cuda.device_count() < 64:
        with pytest.raises(ValueError, match="CUDA device"):
            node.create(gpus=64, ulysses_degree=0, ring_degree=0, cfg_degree=0, dtype="bf16",
                        attention_backend="auto", gpu_memory_fraction=1.0, device="cuda")


def test_loader_inputs_without_comfyui():
    it = NODES["XDitUSPWanVideoModelLoader"].INPUT_TYPES()["required"]
    assert isinstance(it["unet_name"][0], list)
    assert it["xdit_usp_config"][0] == "XDIT_USP_CONFIG" == NODES["XDitUSPConfigNode"].RETURN_TYPES[0]
    assert "default" in it["weight_dtype"][0]


# ---------------------------------------------------------------------------------------- workflow
def _workflow():
    wf = W.load_example()
    assert isinstance(wf["nodes"], list) and isinstance(wf["links"], list)
    return wf


def test_example_uses_only_known_node_types():
    wf = _workflow()
    types = {n["type"] for n in wf["nodes"]}
    assert types <= W.NATIVE_TYPES | W.OUR_TYPES, types - W.NATIVE_TYPES - W.OUR_TYPES
    assert W.OUR_TYPES <= types
    assert "UNETLoader" not in types


def test_example_links_are_consistent():
    wf = _workflow()
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"])
    ids = [l[0] for l in wf["links"]]
    assert len(set(ids)) == len(ids)
    assert wf["last_link_id"] >= max(ids) and wf["last_node_id"] >= max(nodes)
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert out["type"] == typ == inp["type"], (link_id, out, inp, typ)
        assert link_id in out["links"] and inp["link"] == link_id
    # every input's link and every output's links appear in the link table
    for n in wf["nodes"]:
        for i in n.get("inputs", []):
            assert i["link"] is None or i["link"] in ids
        for o in n.get("outputs", []):
            assert all(l in ids for l in o.get("links") or [])


def test_example_our_nodes_match_their_classes():
    wf = _workflow()
    for n in wf["nodes"]:
        if n["type"] not in W.OUR_TYPES:
            continue
        cls = NODES[n["type"]]
        assert [o["type"] for o in n["outputs"]] == list(cls.RETURN_TYPES)
        specs = {name: spec for name, spec, _ in W.ordered_inputs(cls.INPUT_TYPES())}
        for i in n["inputs"]:
            assert W.input_kind(specs[i["name"]]) == i["type"]
        widgets = [(name, spec) for name, spec in specs.items() if W.is_widget(spec)]
        assert len(n["widgets_values"]) == len(widgets)
        for (name, spec), v in zip(widgets, n["widgets_values"]):
            if isinstance(spec[0], list) and spec[0]:
                assert v in spec[0], (name, v)
    api = W.ui_to_api(wf, {k: NODES[k] for k in W.OUR_TYPES} | {t: _Stub for t in W.NATIVE_TYPES})
    cfg = api["1"]["inputs"]
    assert cfg["gpus"] == 2 and cfg["ulysses_degree"] == 0 and cfg["ring_degree"] == 0 and cfg["cfg_degree"] == 0
    assert api["2"]["inputs"] == {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default",
                                  "xdit_usp_config": ["1", 0]}


class _Stub:
    @classmethod
    def INPUT_TYPES(cls):
        return {}


def test_example_defaults():
    wf = _workflow()
    by_type = {}
    for n in wf["nodes"]:
        by_type.setdefault(n["type"], []).append(n)
    assert by_type["XDitUSPWanVideoModelLoader"][0]["widgets_values"][0] == "wan2.1_t2v_1.3B_fp16.safetensors"
    assert by_type["EmptyHunyuanLatentVideo"][0]["widgets_values"][:3] == [832, 480, 33]
    ks = by_type["KSampler"][0]["widgets_values"]
    assert ks[2:6] == [30, 6.0, "uni_pc", "simple"]
    assert by_type["ModelSamplingSD3"][0]["widgets_values"] == [8.0]
    assert by_type["CLIPLoader"][0]["widgets_values"][1] == "wan"
    assert len(by_type["CLIPTextEncode"]) == 2


# ------------------------------------------------------------------- against ComfyUI, when present
def _comfy_nodes():
    if not os.environ.get("COMFYUI_DIR"):
        pytest.skip("COMFYUI_DIR is not set: native node types checked against the explicit list only")
    try:
        import comfy_harness
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"ComfyUI not importable: {e}")
    try:
        return comfy_harness.boot()
    except comfy_harness.ComfyUnavailable as e:
        pytest.skip(str(e))


def test_example_native_types_exist_in_comfyui():
    nodes = _comfy_nodes()
    wf = _workflow()
    for t in W.NATIVE_TYPES:
        assert t in nodes.NODE_CLASS_MAPPINGS, t
    for t in W.OUR_TYPES:
        assert t in nodes.NODE_CLASS_MAPPINGS, t  # registered through ComfyUI's custom node loader
    for n in wf["nodes"]:
        cls = nodes.NODE_CLASS_MAPPINGS[n["type"]]
        assert [str(o["type"]) for o in n["outputs"]] == [str(t) for t in cls.RETURN_TYPES], n["type"]
        specs = {name: spec for name, spec, _ in W.ordered_inputs(cls.INPUT_TYPES())}
        for i in n["inputs"]:
            assert W.input_kind(specs[i["name"]]) == i["type"], (n["type"], i)
    import comfy.samplers

    ks = next(n for n in wf["nodes"] if n["type"] == "KSampler")["widgets_values"]
    assert ks[4] in comfy.samplers.KSampler.SAMPLERS and ks[5] in comfy.samplers.KSampler.SCHEDULERS
