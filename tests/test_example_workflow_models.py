"""The example workflow as a user meets it in ComfyUI's web UI: each model loader lists its file in
`properties.models` (name, url, directory), as ComfyUI's own templates do, so the Missing Models panel
names the folder and offers the download; a Markdown note says where the files go and what to set.

How the frontend (comfyui_frontend_package) uses `properties.models`: a loader's combo widget whose
value is a model file name that is not among the widget's options is a missing model; its folder is
the frontend's built-in category for the node type (UNETLoader -> diffusion_models, CLIPLoader ->
text_encoders, VAELoader -> vae, ...; none for a custom node, shown as "Unknown"). The node's
`properties.models` entries whose `name` equals one of its widget values then fill in the url, and the
directory when the category is unknown; an entry whose directory differs from a known category is
ignored. A row offers a download only with both url and directory, an https://huggingface.co/ (or
civitai) url and a .safetensors/.sft/.ckpt/.pth/.pt name.
"""
from __future__ import annotations

import glob
import os
import re
import sys
import tempfile
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_harness  # noqa: E402
import workflow_utils as W  # noqa: E402

# The file name extensions the frontend treats as model files (its isModelFileName).
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".onnx", ".gguf")
# The model folder each loader's file widget lists (checked against ComfyUI below).
FOLDERS = {"XDitUSPWanVideoModelLoader": "diffusion_models", "CLIPLoader": "text_encoders", "VAELoader": "vae"}
REPO = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/"


def _model_nodes(wf):
    """Every node with a widget value that is a model file name: the nodes that load a model file."""
    return [n for n in wf["nodes"] if n["type"] not in W.UI_ONLY_TYPES and any(
        isinstance(v, str) and v.lower().endswith(MODEL_EXTENSIONS) for v in n.get("widgets_values") or [])]


def _notes(wf):
    return [n for n in wf["nodes"] if n["type"] in W.UI_ONLY_TYPES]


# --------------------------------------------------------------------------------- no ComfyUI needed
def test_every_model_loader_lists_its_file():
    wf = W.load_example()
    loaders = _model_nodes(wf)
    assert sorted(n["type"] for n in loaders) == sorted(FOLDERS)
    for n in loaders:
        models = n["properties"].get("models")
        assert models and len(models) == 1, (n["type"], models)
        (m,) = models
        assert set(m) == {"name", "url", "directory"}, m
        # the frontend applies an entry only when its name is one of the node's widget values
        assert m["name"] == n["widgets_values"][0] and m["directory"] == FOLDERS[n["type"]], (n["type"], m)
    listed = [n["type"] for n in wf["nodes"] if "models" in n.get("properties", {})]
    assert sorted(listed) == sorted(FOLDERS)


def test_model_urls_are_the_comfy_org_huggingface_files():
    for n in _model_nodes(W.load_example()):
        (m,) = n["properties"]["models"]
        u = urlsplit(m["url"])
        assert u.scheme == "https" and u.netloc == "huggingface.co", m["url"]
        assert u.path.endswith("/" + m["name"]) and u.query in ("", "download=true") and not u.fragment, m["url"]
        # as ComfyUI's text_to_video_wan template: Comfy-Org's repackaged files, split_files/<folder>/<name>
        assert m["url"].split("?")[0] == f"{REPO}{m['directory']}/{m['name']}", m["url"]


def test_note_tells_the_user_the_steps():
    wf = W.load_example()
    (note,) = _notes(wf)
    assert note["type"] == "MarkdownNote" and not note["inputs"] and not note["outputs"]
    (text,) = note["widgets_values"]
    for n in _model_nodes(wf):
        (m,) = n["properties"]["models"]
        assert f"models/{m['directory']}" in text and m["name"] in text, m
    for words in ("bash install_xdit_usp.sh", "custom_nodes/comfyui-xdit-usp", "`gpus`", "`weight_sharding`",
                  "`auto`", "`fsdp`", "24–48 GB"):
        assert words in text, words
    assert len(text) < 1500, "keep the note short"
    # it sits beside the graph, not on top of a node
    (x, y), (w, h) = note["pos"], note["size"]
    for n in wf["nodes"]:
        if n is not note:
            (nx, ny), (nw, nh) = n["pos"], n["size"]
            assert x + w <= nx or nx + nw <= x or y + h <= ny or ny + nh <= y, n["type"]


def test_native_loader_folders_match_the_frontends_categories():
    """For a node type the frontend knows, an entry whose directory differs from its category is ignored."""
    try:
        import comfyui_frontend_package
    except ImportError:
        pytest.skip("comfyui_frontend_package is not installed")
    assets = os.path.join(os.path.dirname(comfyui_frontend_package.__file__), "static", "assets")
    source = ""
    for path in glob.glob(os.path.join(assets, "*.js")):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if "CLIPLoader" in text and "getCategoryForNodeType" in text:
            source += text
    if not source:
        pytest.skip("this frontend has no model-to-node table (getCategoryForNodeType)")
    q = "[`'\"]"
    for n in _model_nodes(W.load_example()):
        if n["type"] in W.OUR_TYPES:
            continue
        (m,) = n["properties"]["models"]
        pattern = rf"\[{q}{re.escape(m['directory'])}{q},{q}{re.escape(n['type'])}{q},"
        assert re.search(pattern, source), (n["type"], m["directory"])


# ------------------------------------------------------------------------- against ComfyUI, when present
@pytest.fixture(scope="module")
def nodes():
    return comfy_harness.nodes_or_skip()


def _options(spec):
    return list(spec[0]) if isinstance(spec[0], (list, tuple)) else list(spec[1]["options"])


def test_model_directories_are_the_folders_comfyui_lists_for_the_input(nodes):
    """A file saved as `directory`/`name` is what the loader's widget offers: the folder is the right one."""
    import folder_paths

    wf = W.load_example()
    api = W.ui_to_api(wf, nodes.NODE_CLASS_MAPPINGS)
    with tempfile.TemporaryDirectory(prefix="xdit_usp_models_") as d:
        added = []
        try:
            for n in _model_nodes(wf):
                (m,) = n["properties"]["models"]
                assert m["directory"] in folder_paths.folder_names_and_paths, m
                (widget,) = [k for k, v in api[str(n["id"])]["inputs"].items() if v == m["name"]]
                cls = nodes.NODE_CLASS_MAPPINGS[n["type"]]

                def offered():
                    folder_paths.filename_list_cache.clear()
                    specs = {k: s for k, s, _ in W.ordered_inputs(cls.INPUT_TYPES())}
                    return m["name"] in _options(specs[widget])

                if offered():  # this ComfyUI has the file: then it is in that folder
                    assert folder_paths.get_full_path(m["directory"], m["name"]), (n["type"], m)
                    continue
                folder = os.path.join(d, m["directory"])
                os.makedirs(folder)
                open(os.path.join(folder, m["name"]), "wb").close()
                folder_paths.add_model_folder_path(m["directory"], folder)
                added.append((m["directory"], folder))
                assert offered(), (n["type"], widget, m)
        finally:
            for directory, folder in added:  # later tests must not list a deleted folder
                folder_paths.folder_names_and_paths[directory][0].remove(folder)
            folder_paths.filename_list_cache.clear()
