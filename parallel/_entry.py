"""The pack's one import identity, and the script that torchrun runs in each worker process.

The pack may live in a folder with any name (ComfyUI's custom_nodes/comfyui-xdit-usp, a pip
install, a checkout). `bind_package` makes that folder importable as `comfyui_xdit_usp` in this
process, so every module of the pack has one name. The workers, the benchmarks and the tests use
it; they reach this file by its path, since nothing of the pack is importable before it runs:

    runpy.run_path(os.path.join(pack_dir, "parallel", "_entry.py"))["bind_package"]()

Workers bind the package without running its `__init__`: a rank needs only `parallel/` and the
mapping, and the `__init__` is ComfyUI's entry point (it registers the nodes), whose imports a rank
must never depend on. The wire carries no pickled classes, so the name a rank uses need not be the
one the owner was imported under (ComfyUI imports the folder under its own name).
"""
import importlib
import importlib.util
import os
import sys
import types

PACKAGE = "comfyui_xdit_usp"
PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bind_package(run_init: bool = True) -> types.ModuleType:
    """`import comfyui_xdit_usp` resolves to the folder this file sits in; returns that package.

    A package of that name already imported from this folder is returned as it is; one imported
    from another folder is an ImportError (two copies of the pack in one process). Otherwise the
    package is made from this folder, whatever an installed distribution of the same name says,
    and its `__init__` runs if `run_init`."""
    pkg = sys.modules.get(PACKAGE)
    if pkg is not None:
        paths = [os.path.realpath(p) for p in getattr(pkg, "__path__", [])]
        if os.path.realpath(PACK_DIR) not in paths:
            raise ImportError(f"{PACKAGE} is already imported from {paths}, not from {PACK_DIR}")
        return pkg
    spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(PACK_DIR, "__init__.py"),
                                                  submodule_search_locations=[PACK_DIR])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = pkg
    if run_init:
        try:
            spec.loader.exec_module(pkg)
        except BaseException:
            del sys.modules[PACKAGE]
            raise
    return pkg


if __name__ == "__main__":
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # don't let parallel/*.py shadow top-level modules (e.g. `transport`)
    bind_package(run_init=False)
    importlib.import_module(PACKAGE + ".parallel.worker").main()
