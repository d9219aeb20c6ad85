"""The pack's import outside ComfyUI and the example workflow's structure (no ComfyUI needed); with
COMFYUI_DIR set and ComfyUI importable: the V3 node schemas, the interface saved workflows rely on,
the workflow's node types against ComfyUI's own, and every ComfyUI API the pack relies on."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_harness  # noqa: E402
import workflow_utils as W  # noqa: E402

pack = W.load_pack()


def test_import_without_comfyui_imports_no_comfy():
    code = (
        "import inspect, sys; sys.path.insert(0, %r); import workflow_utils as W; p = W.load_pack(); "
        "assert inspect.iscoroutinefunction(p.comfy_entrypoint); "
        "assert not hasattr(p, 'NODE_CLASS_MAPPINGS'), 'a V1 mapping would hide comfy_entrypoint from ComfyUI'; "
        "bad = [m for m in ('comfy', 'comfy_api', 'folder_paths', 'nodes', 'diffusers') if m in sys.modules]; "
        "assert not bad, bad; print('ok')"
    ) % os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# ------------------------------------------------------------------- against ComfyUI, when present
@pytest.fixture(scope="module")
def nodes():
    return comfy_harness.nodes_or_skip()


def test_registered_through_comfy_entrypoint(nodes):
    for name in W.ALL_OUR_TYPES:
        assert nodes.NODE_CLASS_MAPPINGS[name].GET_SCHEMA().node_id == name
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["XDitUSPConfigNode"] == "XDit+USP Config"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["XDitUSPWanVideoModelLoader"] == "XDit+USP WanVideo Model Loader"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["XDitUSPVAEDecode"] == "XDit+USP VAE Decode"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["XDitUSPVAEEncode"] == "XDit+USP VAE Encode"


@pytest.mark.parametrize("name", sorted(W.ALL_OUR_TYPES))
def test_node_schema(nodes, name):
    import inspect

    cls = nodes.NODE_CLASS_MAPPINGS[name]
    schema = cls.GET_SCHEMA()
    assert schema.category == "WanVideo/xDiT-USP" and schema.description
    for i in schema.inputs:
        assert i.tooltip, f"{name} input {i.id} has no tooltip"
        opts = i.as_dict()
        if "options" in opts and "default" in opts:
            assert opts["default"] in opts["options"], i.id
        if "min" in opts and "default" in opts:
            assert opts["min"] <= opts["default"] <= opts["max"], i.id
    for o in schema.outputs:
        assert o.tooltip, f"{name} output {o.id} has no tooltip"
    params = set(inspect.signature(cls.execute).parameters)
    assert params == {i.id for i in schema.inputs}


# Node ids, input names and order, and output types are what saved workflows refer to. Inputs added
# later are optional, at the end, so a workflow saved before them still runs (with their default).
SAVED_INTERFACE = {
    "XDitUSPConfigNode": (["gpus", "ulysses_degree", "ring_degree", "cfg_degree", "dtype", "attention_backend",
                           "gpu_memory_fraction", "device"],
                          ["weight_sharding", "compile", "tensor_parallel_degree", "pipeline_parallel_degree", "comm_overlap",
                           "comm_dtype"], ["XDIT_USP_CONFIG"],
                          ["xdit_usp_config"]),
    "XDitUSPWanVideoModelLoader": (["unet_name", "weight_dtype", "xdit_usp_config"], [], ["MODEL"], ["MODEL"]),
    "XDitUSPVAEDecode": (["samples", "vae", "xdit_usp_config"], [], ["IMAGE"], ["IMAGE"]),
    "XDitUSPVAEEncode": (["pixels", "vae", "xdit_usp_config"], [], ["LATENT"], ["LATENT"]),
}


@pytest.mark.parametrize("name", sorted(W.ALL_OUR_TYPES))
def test_saved_workflow_interface_unchanged(nodes, name):
    cls = nodes.NODE_CLASS_MAPPINGS[name]
    info = cls.GET_NODE_INFO_V1()
    inputs, optional, types, names = SAVED_INTERFACE[name]
    assert info["input_order"] == ({"required": inputs, "optional": optional} if optional else {"required": inputs})
    assert list(info["output"]) == types and list(info["output_name"]) == names


def test_config_node_builds_and_validates(nodes):
    node = nodes.NODE_CLASS_MAPPINGS["XDitUSPConfigNode"]

    def create(**kw):
        return node.execute(**kw).result

    (cfg,) = create(gpus=2, ulysses_degree=0, ring_degree=0, cfg_degree=0, dtype="fp32",
                    attention_backend="auto", gpu_memory_fraction=1.0, device="cpu")
    assert cfg.world_size == 2 and cfg.device == "cpu" and cfg.dtype == "fp32"
    assert cfg.weight_sharding == "auto"  # a workflow saved before the input existed
    (cfg,) = create(gpus=2, ulysses_degree=0, ring_degree=0, cfg_degree=0, dtype="fp32",
                    attention_backend="auto", gpu_memory_fraction=1.0, device="cpu", weight_sharding="fsdp")
    assert cfg.weight_sharding == "fsdp"
    assert cfg.compile is False  # a workflow saved before the input existed
    (cfg,) = create(gpus=2, ulysses_degree=0, ring_degree=0, cfg_degree=0, dtype="fp32",
                    attention_backend="auto", gpu_memory_fraction=1.0, device="cpu", compile=True)
    assert cfg.compile is True
    assert str(cfg.resolve(2)) == "cfg2xulysses1xring1"
    assert cfg.tensor_parallel_degree == cfg.pipeline_parallel_degree == 1  # a workflow saved before the inputs existed
    (cfg,) = create(gpus=4, ulysses_degree=0, ring_degree=0, cfg_degree=0, dtype="fp16", attention_backend="auto",
                    gpu_memory_fraction=1.0, device="cpu", tensor_parallel_degree=2, pipeline_parallel_degree=2)
    assert str(cfg.resolve(12)) == "pipeline2xtensor2xcfg1xulysses1xring1"  # the seed's example config
    assert (cfg.comm_overlap, cfg.comm_dtype) == ("auto", "default")  # a workflow saved before the inputs existed
    with pytest.raises(ValueError, match="comm_dtype='fp8' sends bf16/fp16 activations as fp8 between GPUs; it needs "
                                         "device='cuda'"):
        create(gpus=2, ulysses_degree=0, ring_degree=0, cfg_degree=0, dtype="bf16", attention_backend="auto",
               gpu_memory_fraction=1.0, device="cpu", comm_overlap="off", comm_dtype="fp8")
    with pytest.raises(ValueError, match="Degrees that multiply to 4") as e:
        create(gpus=4, ulysses_degree=3, ring_degree=0, cfg_degree=0, dtype="bf16",
               attention_backend="auto", gpu_memory_fraction=1.0, device="cpu")
    assert "must equal gpus 4" in str(e.value) and "world_size" not in str(e.value)  # the node's words
    with pytest.raises(ValueError, match="gpu_memory_fraction"):
        create(gpus=1, ulysses_degree=0, ring_degree=0, cfg_degree=0, dtype="bf16",
               attention_backend="auto", gpu_memory_fraction=1.5, device="cpu")
    import torch

    if torch.cuda.device_count() < 64:
        with pytest.raises(ValueError, match="CUDA device") as e:
            create(gpus=64, ulysses_degree=0, ring_degree=0, cfg_degree=0, dtype="bf16",
                   attention_backend="auto", gpu_memory_fraction=1.0, device="cuda")
        assert "world_size" not in str(e.value)


def test_loader_inputs(nodes):
    it = nodes.NODE_CLASS_MAPPINGS["XDitUSPWanVideoModelLoader"].INPUT_TYPES()["required"]
    assert it["unet_name"][0] == "COMBO" and isinstance(it["unet_name"][1]["options"], list)
    assert it["xdit_usp_config"][0] == "XDIT_USP_CONFIG" == nodes.NODE_CLASS_MAPPINGS["XDitUSPConfigNode"].RETURN_TYPES[0]
    assert {"default", "bf16", "fp8_e4m3fn", "fp8_e5m2"} <= set(it["weight_dtype"][1]["options"])


# ---------------------------------------------------------------------------------------- workflow
def _workflow():
    wf = W.load_example()
    assert isinstance(wf["nodes"], list) and isinstance(wf["links"], list)
    return wf


def test_example_uses_only_known_node_types():
    wf = _workflow()
    types = {n["type"] for n in wf["nodes"]}
    known = W.NATIVE_TYPES | W.OUR_TYPES | W.UI_ONLY_TYPES
    assert types <= known, types - known
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


def test_example_our_nodes_match_their_classes(nodes):
    NODES = nodes.NODE_CLASS_MAPPINGS
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
            options = spec[1].get("options") if len(spec) > 1 else None
            if options:
                assert v in options, (name, v)
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


def test_example_native_types_exist_in_comfyui(nodes):
    wf = _workflow()
    for t in W.NATIVE_TYPES:
        assert t in nodes.NODE_CLASS_MAPPINGS, t
    for t in W.OUR_TYPES:
        assert t in nodes.NODE_CLASS_MAPPINGS, t  # registered through ComfyUI's custom node loader
    for n in wf["nodes"]:
        if n["type"] in W.UI_ONLY_TYPES:
            assert n["type"] not in nodes.NODE_CLASS_MAPPINGS  # the UI's own; never sent to the server
            continue
        cls = nodes.NODE_CLASS_MAPPINGS[n["type"]]
        assert [str(o["type"]) for o in n["outputs"]] == [str(t) for t in cls.RETURN_TYPES], n["type"]
        specs = {name: spec for name, spec, _ in W.ordered_inputs(cls.INPUT_TYPES())}
        for i in n["inputs"]:
            assert W.input_kind(specs[i["name"]]) == i["type"], (n["type"], i)
    import comfy.samplers

    ks = next(n for n in wf["nodes"] if n["type"] == "KSampler")["widgets_values"]
    assert ks[4] in comfy.samplers.KSampler.SAMPLERS and ks[5] in comfy.samplers.KSampler.SCHEDULERS


# --------------------------------------------------------- the ComfyUI API xdit_usp_model.py relies on
# (dotted name, its parameters, or None for "must exist"). A ComfyUI release that renames or
# re-signs one of these breaks the pack: this test names which.
COMFY_API = [
    ("comfy.model_patcher.ModelPatcher.__init__",
     "self, model, load_device, offload_device, size=0, weight_inplace_update=False"),
    ("comfy.model_patcher.ModelPatcher._load_list", "self, for_dynamic=False, default_device=None"),
    ("comfy.model_patcher.ModelPatcher.load",
     "self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False"),
    ("comfy.model_patcher.ModelPatcher.partially_load", "self, device_to, extra_memory=0, force_patch_weights=False"),
    ("comfy.model_patcher.ModelPatcher.partially_unload", "self, device_to, memory_to_free=0, force_patch_weights=False"),
    ("comfy.model_patcher.ModelPatcher.patch_weight_to_device",
     "self, key, device_to=None, inplace_update=False, return_weight=False, force_cast=False"),
    ("comfy.model_patcher.ModelPatcher.detach", "self, unpatch_all=True"),
    ("comfy.model_patcher.ModelPatcher.add_callback_with_key", "self, call_type, key, callback"),
    ("comfy.model_patcher.ModelPatcher.register_all_hook_patches", None),
    ("comfy.model_patcher.ModelPatcher.add_patches", "self, patches, strength_patch=1.0, strength_model=1.0"),
    ("comfy.patcher_extension.CallbacksMP.ON_LOAD", None),
    ("comfy.patcher_extension.CallbacksMP.ON_DETACH", None),
    ("comfy.patcher_extension.CallbacksMP.ON_REGISTER_ALL_HOOK_PATCHES", None),
    ("comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL", None),
    ("comfy.patcher_extension.WrapperExecutor.new_class_executor",
     "original, class_obj, wrappers, idx=0"),
    ("comfy.patcher_extension.get_all_wrappers",
     "wrapper_type, transformer_options, is_model_options=False"),
    ("comfy.model_base.WAN21.memory_required", "self, input_shape, cond_shapes={}"),
    ("comfy.model_base.WAN21_Vace", None),
    ("comfy.model_detection.model_config_from_unet",
     "state_dict, unet_key_prefix, use_base_if_no_match=False, metadata=None"),
    ("comfy.ldm.wan.model.WanModel.forward",
     "self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs"),
    ("comfy.ldm.common_dit.pad_to_patch_size", None),
    ("comfy.model_management.get_torch_device", "()"),
    ("comfy.model_management.unet_offload_device", "()"),
    ("comfy.model_management.throw_exception_if_processing_interrupted", "()"),
    ("comfy.weight_adapter.LoRAAdapter", None),
    ("comfy.weight_adapter.WeightAdapterBase", None),
]


def _resolve(dotted: str):
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("name,params", COMFY_API, ids=[n for n, _ in COMFY_API])
def test_comfyui_api_the_pack_relies_on(nodes, name, params):
    import inspect

    try:
        obj = _resolve(name)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"this ComfyUI has no {name} ({e}); xdit_usp_model.py relies on it")
    if params is not None:  # names, kinds and defaults; annotations are not compared
        found = ", ".join(str(p.replace(annotation=inspect.Parameter.empty))
                          for p in inspect.signature(obj).parameters.values())
        assert found == params.strip("()"), (
            f"ComfyUI changed {name}: the pack was written against ({params}), this ComfyUI has ({found})")


def test_patcher_callbacks_and_hook_paths_are_what_the_pack_hooks_into(nodes):
    """ComfyUI's load runs ON_LOAD callbacks and then apply_hooks; detach runs ON_DETACH;
    registering hooks runs ON_REGISTER_ALL_HOOK_PATCHES; a clone keeps its callbacks."""
    import inspect

    import comfy.model_patcher as mp

    src = {f: inspect.getsource(getattr(mp.ModelPatcher, f)) for f in ("load", "detach", "register_all_hook_patches")}
    assert "self._load_list()" in src["load"] and "CallbacksMP.ON_LOAD" in src["load"], "ModelPatcher.load changed"
    assert "CallbacksMP.ON_DETACH" in src["detach"], "ModelPatcher.detach changed"
    assert "CallbacksMP.ON_REGISTER_ALL_HOOK_PATCHES" in src["register_all_hook_patches"]
    import torch

    p = mp.ModelPatcher(torch.nn.Linear(1, 1), torch.device("cpu"), torch.device("cpu"), size=1)
    p.add_callback_with_key("on_load_after", "xdit_usp", print)
    assert p.clone().get_callbacks("on_load_after", "xdit_usp") == [print]
