#!/usr/bin/env bash
# Install comfyui-xdit-usp into the Python environment that runs ComfyUI, then self-test it.
# Safe to run again: every step checks before it changes anything. Never installs torch.
set -Eeuo pipefail

PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
XFUSER_SPEC="xfuser==0.7.0"   # keep equal to pyproject.toml [project.optional-dependencies] cuda
MIN_TORCH="2.5"               # keep equal to pyproject.toml / requirements.txt
MAX_REL_ERR="1e-5"

usage() {
    cat <<EOF
Usage: bash install_xdit_usp.sh [options]

Installs comfyui-xdit-usp (this folder: $PACK_DIR) into the Python that runs ComfyUI:
  1. checks Python >= 3.10 and that torch is importable (torch is never installed or replaced),
  2. reports torch, CUDA and the GPUs,
  3. pip installs requirements.txt and this folder (editable, so 'python -m comfyui_xdit_usp' works),
  4. with CUDA: installs the CUDA extra ($XFUSER_SPEC) and tries a prebuilt flash-attn wheel,
  5. imports the pack and runs 2-rank CPU self-tests (cfg split, Ulysses, ring; each must match
     a single-process forward to max_rel_err <= $MAX_REL_ERR).

Options:
  --python PATH     Python interpreter to install into. Default: \$PYTHON, else the active
                    virtualenv, else ComfyUI's venv/.venv next to custom_nodes/, else 'python',
                    else 'python3' on PATH.
  --no-cuda-extra   do not install xfuser or flash-attn, even when CUDA is present
  --skip-self-test  skip the 2-rank CPU self-tests (the import check still runs)
  --dry-run         run the checks, print the install commands, change nothing
  -h, --help        show this help

Exit status: 0 on success, 1 on failure (with a hint), 2 on a usage error.
EOF
}

# ---- output helpers ------------------------------------------------------------------------
say()  { printf '[xdit-usp] %s\n' "$*"; }
warn() { printf '[xdit-usp] WARNING: %s\n' "$*" >&2; }
HINT_GENERIC="Troubleshooting: re-run with the Python that starts ComfyUI (--python /path/to/ComfyUI/venv/bin/python);
  check network access to PyPI; see XDIT_USP_README.md (Install, Troubleshooting)."
die() {  # die MESSAGE [HINT]
    trap - ERR
    printf '[xdit-usp] ERROR: %s\n' "$1" >&2
    printf '  %s\n' "${2:-$HINT_GENERIC}" >&2
    exit 1
}
on_err() {
    local rc=$? line=$1 cmd=$2
    trap - ERR
    printf '[xdit-usp] ERROR: step failed (exit %s) at line %s: %s\n' "$rc" "$line" "$cmd" >&2
    printf '  %s\n' "$HINT_GENERIC" >&2
    exit 1
}
trap 'on_err "$LINENO" "$BASH_COMMAND"' ERR

# ---- options -------------------------------------------------------------------------------
PY="${PYTHON:-}"
PY_FROM=""
[[ -n "$PY" ]] && PY_FROM="\$PYTHON"
CUDA_EXTRA=1
SELF_TEST=1
DRY_RUN=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --python)
            [[ $# -ge 2 && -n "$2" ]] || { echo "install_xdit_usp.sh: --python needs a path" >&2; usage >&2; exit 2; }
            PY="$2"; PY_FROM="--python"; shift 2 ;;
        --python=*) PY="${1#--python=}"; PY_FROM="--python"; shift ;;
        --no-cuda-extra) CUDA_EXTRA=0; shift ;;
        --skip-self-test) SELF_TEST=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        *) echo "install_xdit_usp.sh: unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
done

# run CMD...: executes it, or only prints it under --dry-run.
run() {
    if [[ $DRY_RUN == 1 ]]; then
        printf '[xdit-usp] [dry-run] would run:'; printf ' %q' "$@"; printf '\n'
    else
        printf '[xdit-usp] $'; printf ' %q' "$@"; printf '\n'
        "$@"
    fi
}

# ---- 1. which Python -----------------------------------------------------------------------
if [[ -z "$PY" && -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    PY="$VIRTUAL_ENV/bin/python"; PY_FROM="active virtualenv"
fi
if [[ -z "$PY" && "$(basename "$(dirname "$PACK_DIR")")" == "custom_nodes" ]]; then
    comfy_root="$(dirname "$(dirname "$PACK_DIR")")"
    for v in venv .venv; do
        if [[ -x "$comfy_root/$v/bin/python" ]]; then PY="$comfy_root/$v/bin/python"; PY_FROM="ComfyUI's $v"; break; fi
    done
fi
if [[ -z "$PY" ]]; then
    for c in python python3; do
        if command -v "$c" >/dev/null 2>&1; then PY="$(command -v "$c")"; PY_FROM="'$c' on PATH"; break; fi
    done
fi
[[ -n "$PY" ]] || die "no Python found (no \$PYTHON, no 'python' or 'python3' on PATH)" \
    "Pass the Python that runs ComfyUI: bash install_xdit_usp.sh --python /path/to/ComfyUI/venv/bin/python"
if [[ "$PY" != */* ]]; then  # a bare name: resolve it on PATH
    command -v "$PY" >/dev/null 2>&1 || die "Python '$PY' ($PY_FROM) is not on PATH" \
        "Pass a full path: --python /path/to/ComfyUI/venv/bin/python"
    PY="$(command -v "$PY")"
fi
[[ -x "$PY" && ! -d "$PY" ]] || die "Python '$PY' ($PY_FROM) does not exist or is not executable" \
    "Pass the Python that runs ComfyUI: --python /path/to/ComfyUI/venv/bin/python (see 'which python' in the shell you start ComfyUI from)"

py_version="$("$PY" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null)" \
    || die "'$PY' did not run as a Python interpreter" "Pass a Python executable with --python"
say "Python     $PY ($py_version, chosen by $PY_FROM)"
IFS=. read -r py_major py_minor _ <<<"$py_version"
if (( py_major < 3 || (py_major == 3 && py_minor < 10) )); then
    die "Python $py_version is too old: comfyui-xdit-usp needs Python >= 3.10" \
        "Use the Python >= 3.10 that runs ComfyUI (ComfyUI itself needs a recent Python): --python /path/to/python3.10+"
fi

# ---- 2. torch (never installed here) -------------------------------------------------------
torch_report="$("$PY" - <<'PYEOF' 2>&1
import importlib.metadata, os
import torch
print("version", torch.__version__)
print("path", os.path.dirname(torch.__file__))
try:  # the version pip knows torch by
    print("dist", importlib.metadata.version("torch"))
except importlib.metadata.PackageNotFoundError:
    print("dist", "-")
cuda = torch.cuda.is_available()
print("cuda", int(cuda), torch.version.cuda or "-")
n = torch.cuda.device_count() if cuda else 0
print("gpus", n)
for i in range(n):
    p = torch.cuda.get_device_properties(i)
    print("gpu", i, "%.1f" % (p.total_memory / 2**30), p.name)
PYEOF
)" || die "torch is not importable in $PY:
$(printf '%s\n' "$torch_report" | tail -n 3 | sed 's/^/    /')" \
    "Install ComfyUI (and its torch build for your GPU) into this Python first, or pass the Python that runs ComfyUI with --python. This script never installs torch: that could replace your CUDA build."

TORCH_VERSION="$(awk '$1=="version"{print $2}' <<<"$torch_report")"
HAS_CUDA="$(awk '$1=="cuda"{print $2}' <<<"$torch_report")"
CUDA_VERSION="$(awk '$1=="cuda"{print $3}' <<<"$torch_report")"
N_GPUS="$(awk '$1=="gpus"{print $2}' <<<"$torch_report")"
if [[ $HAS_CUDA == 1 ]]; then
    say "torch      $TORCH_VERSION, CUDA $CUDA_VERSION available, $N_GPUS GPU(s)"
    while read -r _ idx mem name; do
        say "  GPU $idx   $name, $mem GiB"
    done < <(grep '^gpu ' <<<"$torch_report")
    (( N_GPUS >= 2 )) || warn "only $N_GPUS GPU visible: the nodes need 2+ GPUs to speed anything up (check CUDA_VISIBLE_DEVICES)"
else
    say "torch      $TORCH_VERSION, no CUDA (CPU only: the worker group can run with device=cpu for testing)"
fi
"$PY" - "$TORCH_VERSION" "$MIN_TORCH" <<'PYEOF' || die "torch $TORCH_VERSION is older than $MIN_TORCH" \
    "Upgrade ComfyUI's torch (with the CUDA build matching your driver) to >= $MIN_TORCH, then re-run this script."
import re, sys
def v(s):
    return tuple(int(x) for x in re.findall(r"\d+", s.split("+")[0])[:2])
sys.exit(0 if v(sys.argv[1]) >= v(sys.argv[2]) else 1)
PYEOF

# pip knows torch by its distribution version, which can differ from torch.__version__: PyPI's
# CUDA wheels say 2.9.1+cu128 at import but install as 2.9.1, and no pip pin matches the former.
TORCH_DIST="$(awk '$1=="dist"{print $2}' <<<"$torch_report")"
TORCH_PATH="$(sed -n 's/^path //p' <<<"$torch_report")"
if [[ $TORCH_DIST == - ]]; then
    # Then pip thinks torch is missing and would install a second one to satisfy the requirements,
    # and a pip constraint can limit a version but cannot forbid an install: stop instead.
    die "torch $TORCH_VERSION imports from $TORCH_PATH, but pip does not see it installed (it has no package metadata)" \
        "pip would install a second torch next to it, and this script never installs torch. Use a torch installed by pip or conda ('$PY -m pip show torch' must find it), or pass the Python that runs ComfyUI with --python."
fi
if [[ ${TORCH_DIST%%+*} != "${TORCH_VERSION%%+*}" ]]; then
    warn "torch $TORCH_VERSION imports from $TORCH_PATH, but pip sees torch $TORCH_DIST installed: another copy (PYTHONPATH?) shadows it. pip will keep $TORCH_DIST."
fi

# ---- 3. pip --------------------------------------------------------------------------------
pip_version="$("$PY" -m pip --version 2>/dev/null)" || die "pip is not available in $PY" \
    "Install pip into it: $PY -m ensurepip --upgrade"
say "pip        ${pip_version%% from *}"

# Pin the torch that is installed, so nothing below can upgrade, downgrade or replace it.
WORK="$(mktemp -d "${TMPDIR:-/tmp}/xdit_usp_install.XXXXXX")"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
printf 'torch==%s\n' "$TORCH_DIST" >"$WORK/keep-torch.txt"
PIP=("$PY" -m pip install --constraint "$WORK/keep-torch.txt")

say "installing requirements.txt (torch stays at $TORCH_VERSION: pinned as torch==$TORCH_DIST)"
run "${PIP[@]}" -r "$PACK_DIR/requirements.txt"

# The pack itself: ComfyUI imports this folder from custom_nodes/; the editable install makes the
# same files importable as comfyui_xdit_usp (python -m comfyui_xdit_usp) without a second copy.
installed_at="$("$PY" -c 'import os, comfyui_xdit_usp as m; print(os.path.dirname(os.path.realpath(m.__file__)))' 2>/dev/null || true)"
if [[ "$installed_at" == "$(cd "$PACK_DIR" && pwd -P)" ]]; then
    say "comfyui_xdit_usp already installed from $PACK_DIR (editable): skipping"
else
    [[ -n "$installed_at" ]] && say "comfyui_xdit_usp currently points at $installed_at: re-pointing it at $PACK_DIR"
    run "${PIP[@]}" --no-deps -e "$PACK_DIR"
fi

# ---- 4. CUDA extra -------------------------------------------------------------------------
if [[ $HAS_CUDA != 1 ]]; then
    say "no CUDA: skipping the CUDA extra ($XFUSER_SPEC) and flash-attn"
elif [[ $CUDA_EXTRA == 0 ]]; then
    say "--no-cuda-extra: skipping $XFUSER_SPEC and flash-attn"
else
    say "installing the CUDA extra: $XFUSER_SPEC"
    run "${PIP[@]}" "$XFUSER_SPEC"
    if "$PY" -c 'import flash_attn' >/dev/null 2>&1; then
        say "flash-attn already installed"
    else
        say "trying a prebuilt flash-attn wheel (optional; never built from source)"
        if ! run "${PIP[@]}" --only-binary=:all: flash-attn; then
            warn "no prebuilt flash-attn wheel for this torch/CUDA/Python; carrying on without it"
            warn "(the default attention backend, cuDNN SDPA, needs no flash-attn)"
        fi
    fi
fi

if [[ $DRY_RUN == 1 ]]; then
    say "dry run: checks passed; nothing was installed. Without --dry-run the import check$([[ $SELF_TEST == 1 ]] && echo ' and the 2-rank CPU self-tests') would run next."
    exit 0
fi

# ---- 5. verify -----------------------------------------------------------------------------
cd "$WORK"  # a neutral directory: nothing local can shadow the installed package
say "checking imports"
"$PY" - <<'PYEOF' || die "the pack does not import (see the traceback above)" \
    "Check that requirements.txt installed cleanly in this Python; then re-run this script."
import comfyui_xdit_usp
from comfyui_xdit_usp import comfy_entrypoint  # ComfyUI registers the nodes through it (V3 API)
from comfyui_xdit_usp.parallel import WorkerGroup, XDitUSPConfig  # the runtime
import comfyui_xdit_usp.parallel.worker, comfyui_xdit_usp.wan_to_xdit_mapping
import diffusers, yunchang, safetensors, accelerate
print("[xdit-usp] imports ok: comfy_entrypoint, runtime | diffusers", diffusers.__version__)
PYEOF

if [[ $SELF_TEST == 0 ]]; then
    say "--skip-self-test: not running the 2-rank CPU self-tests"
else
    # Three 2-rank runs of the embedded tiny model, one per kind of split: cond/uncond on separate
    # ranks (cfg), a batch-1 call with both ranks on the sequence (Ulysses), and ring attention.
    tmo=()
    command -v timeout >/dev/null 2>&1 && tmo=(timeout 600)
    for extra in "" "--batch 1" "--cfg 1 --ulysses 1 --ring 2"; do
        # shellcheck disable=SC2206
        args=(run --gpus 2 --device cpu $extra --json)
        say "self-test: python -m comfyui_xdit_usp ${args[*]}"
        if ! "${tmo[@]}" "$PY" -m comfyui_xdit_usp "${args[@]}" >"$WORK/selftest.out" 2>"$WORK/selftest.err"; then
            sed 's/^/    /' "$WORK/selftest.out" >&2
            tail -n 40 "$WORK/selftest.err" | sed 's/^/    /' >&2
            die "the 2-rank CPU self-test failed (output above)" \
                "It starts 2 local workers with torchrun on 127.0.0.1 (gloo, a random free port) and passes tensors through /dev/shm. Check that loopback TCP works and /dev/shm is writable; worker logs are in the xdit_usp_logs_* folder named above."
        fi
        tail -n 1 "$WORK/selftest.out" >"$WORK/selftest.json"
        "$PY" - "$WORK/selftest.json" "$MAX_REL_ERR" <<'PYEOF' || die "the self-test ran but its result is wrong (see above)" \
            "Please report this with the output above: the parallel forward must match the single-process forward."
import json, sys
r = json.load(open(sys.argv[1]))
err, limit = r.get("max_rel_err"), float(sys.argv[2])
ok = err is not None and err <= limit
print("[xdit-usp]   %s: layout %s, attention %s, max_rel_err %s (limit %g), %.1f ms/step"
      % ("passed" if ok else "FAILED", r.get("layout"), r.get("backend"), err, limit, r.get("step_ms", 0.0)))
sys.exit(0 if ok else 1)
PYEOF
    done
fi

say "done. Restart ComfyUI; the nodes are under WanVideo/xDiT-USP (XDit+USP Config, XDit+USP WanVideo Model Loader)."
say "example workflow: $PACK_DIR/example_workflows/xdit_usp_example.json"
