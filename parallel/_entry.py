"""Script that torchrun runs in each worker process.

The pack may live in a folder with any name (ComfyUI's custom_nodes/comfyui-xdit-usp, a pip
install, a checkout), so this file imports the runtime under a private package name bound to the
folder it sits in, without executing the pack's __init__ (no ComfyUI import, no clash with another
copy of the pack or with any other package called `parallel`).
"""
import importlib
import os
import sys
import types

if __name__ == "__main__":
    pack_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    name = "_xdit_usp_pack"
    pkg = types.ModuleType(name)
    pkg.__path__ = [pack_dir]
    pkg.__file__ = os.path.join(pack_dir, "__init__.py")
    sys.modules[name] = pkg
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # don't let parallel/*.py shadow top-level modules (e.g. `transport`)
    importlib.import_module(name + ".parallel.worker").main()
