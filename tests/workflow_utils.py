"""Helpers shared by the tests (no ComfyUI import here): the pack itself, and the example workflow."""
from __future__ import annotations

import json
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "example_workflows", "xdit_usp_example.json")
ENTRY = os.path.join(ROOT, "parallel", "_entry.py")
# The first statement of any Python code a test runs in a new interpreter: it imports this checkout
# as `comfyui_xdit_usp` too, whatever is installed under that name.
BIND_PACK = f"import runpy; runpy.run_path({ENTRY!r})['bind_package']()"
# The command line job (`python -m comfyui_xdit_usp`, `xdit-usp`) of this checkout.
CLI = [sys.executable, "-c", BIND_PACK + "; from comfyui_xdit_usp.__main__ import cli; cli()"]

# Native ComfyUI node types the example workflow may use (checked against ComfyUI when available).
NATIVE_TYPES = {
    "CLIPLoader", "CLIPTextEncode", "EmptyHunyuanLatentVideo", "ModelSamplingSD3", "KSampler",
    "VAELoader", "CreateVideo", "SaveVideo",
}
# Our node types the example workflow uses (it decodes with XDit+USP VAE Decode; native VAEDecode
# works in its place), and every node type the pack registers.
OUR_TYPES = {"XDitUSPConfigNode", "XDitUSPWanVideoModelLoader", "XDitUSPVAEDecode"}
ALL_OUR_TYPES = OUR_TYPES | {"XDitUSPVAEEncode"}
# Frontend-only nodes (the UI marks them isVirtualNode and leaves them out of the API prompt).
UI_ONLY_TYPES = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def load_pack():
    """This checkout as the package `comfyui_xdit_usp`, its __init__ run (parallel/_entry.py's
    `bind_package`, which the workers and the benchmarks use too). tests/conftest.py calls it first,
    so every test imports the pack's modules under that one name."""
    return runpy.run_path(ENTRY)["bind_package"]()


def load_example() -> dict:
    with open(EXAMPLE, encoding="utf-8") as f:
        return json.load(f)


def input_kind(spec) -> str:
    """Type name of an INPUT_TYPES entry: a list of options is a COMBO."""
    t = spec[0]
    if isinstance(t, (list, tuple)):
        return "COMBO"
    return str(t)


def is_widget(spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    kind = input_kind(spec)
    return kind in WIDGET_TYPES or kind == "COMFY_DYNAMICCOMBO_V3"


def ordered_inputs(input_types: dict) -> list[tuple[str, tuple, bool]]:
    out = []
    for section in ("required", "optional"):
        for name, spec in input_types.get(section, {}).items():
            out.append((name, spec, section == "required"))
    return out


def _take_widgets(name, spec, values: list, inputs: dict, prefix: str = ""):
    """Consume this widget's value(s) from `values` into API `inputs` (nested dynamic combos too)."""
    key = prefix + name
    value = values.pop(0)
    inputs[key] = value
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("control_after_generate"):
        values.pop(0)  # "randomize"/"fixed": UI-only
    if input_kind(spec) == "COMFY_DYNAMICCOMBO_V3":
        option = next(o for o in opts["options"] if o["key"] == value)
        for sub, sub_spec, _ in ordered_inputs(option["inputs"]):
            if is_widget(sub_spec) and values:
                _take_widgets(sub, sub_spec, values, inputs, prefix=key + ".")


def ui_to_api(workflow: dict, node_classes: dict) -> dict:
    """LiteGraph UI workflow -> API prompt {id: {class_type, inputs}} using the classes' INPUT_TYPES."""
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in UI_ONLY_TYPES:  # muted / bypassed / notes
            continue
        cls = node_classes[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, spec, _ in ordered_inputs(cls.INPUT_TYPES()):
            if name in linked:
                l = linked[name]
                inputs[name] = [str(l[1]), l[2]]
                if is_widget(spec) and values:  # a widget converted to an input keeps its value slot
                    values.pop(0)
            elif is_widget(spec) and values:
                _take_widgets(name, spec, values, inputs)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
