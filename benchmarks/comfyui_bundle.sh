#!/usr/bin/env bash
# Prepare, in the repo root, what benchmarks/bench_comfyui.py needs on a GPU machine without internet:
#   .comfy/  ComfyUI's source, trimmed to the executor path (no tests, CI, blueprints, API nodes,
#            frontend, tokenizer vocabularies); .comfy/COMFYUI_COMMIT names the commit it came from
#   .whl/    wheels of the ComfyUI requirements that the executor path imports and the GPU image lacks:
#            comfy-aimdo, comfy-kitchen (its pure-Python wheel: no 230 MB of compiled kernels),
#            torchsde, trampoline. PyAV (36 MB) is not carried: bench_comfyui.py stubs it (only
#            video-file nodes call it); pydantic, SQLAlchemy, alembic, kornia, spandrel, blake3 ...
#            are imported by no module on this path (a few comfy_extras nodes fail to import: warnings).
# Both folders are git-ignored (.git/info/exclude of the common git dir). Carry [".whl", ".comfy"].
#
#   bash benchmarks/comfyui_bundle.sh                # ComfyUI from $COMFYUI_SRC or /work/comfyui
#
# Prints the size of .comfy + .whl; fails above 60 MiB (a `run` carries 64 MiB at most).
set -euo pipefail

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
SRC=${COMFYUI_SRC:-/work/comfyui}
PY=${PYTHON:-python3}
LIMIT_MIB=60
cd "$ROOT"
[ -f "$SRC/comfy/model_management.py" ] || { echo "no ComfyUI checkout at $SRC (set COMFYUI_SRC)" >&2; exit 1; }

# --- .comfy: tracked files of the checkout (or every file, for a checkout without git), trimmed
rm -rf .comfy
mkdir -p .comfy
EXCLUDE='^(tests|tests-unit|\.github|\.ci|blueprints|comfy_api_nodes|script_examples|docs|input|output|models|user|custom_nodes|venv)(/|$)'
EXCLUDE+='|^openapi\.yaml$|(^|/)[^/]*tokenizer[^/]*/[^/]+\.(json|txt|model)$'
if git -C "$SRC" rev-parse HEAD >/dev/null 2>&1; then
    commit=$(git -C "$SRC" rev-parse HEAD)
    files=$(git -C "$SRC" ls-files)
else
    commit=unknown
    files=$(cd "$SRC" && find . -type f -not -path './.git/*' -not -name '*.pyc' | sed 's|^\./||')
fi
printf '%s\n' "$files" | grep -vE "$EXCLUDE" | while IFS= read -r f; do
    [ -f "$SRC/$f" ] && printf '%s\n' "$f"   # skip-worktree blobs the checkout lacks
done > /tmp/comfyui_bundle_files.$$
tar -C "$SRC" -T /tmp/comfyui_bundle_files.$$ -cf - | tar -C .comfy -xf -
rm -f /tmp/comfyui_bundle_files.$$
echo "$commit" > .comfy/COMFYUI_COMMIT
# ComfyUI creates models/ input/ output/ user/ folders where it runs; the benchmark adds its own paths
mkdir -p .comfy/models .comfy/custom_nodes

# --- .whl: one version of each; the pins of ComfyUI's requirements.txt where it pins
pin() { grep -iE "^$1==" "$SRC/requirements.txt" | head -1 || true; }
AIMDO=$(pin comfy-aimdo); AIMDO=${AIMDO:-comfy-aimdo==0.4.13}
KITCHEN=$(pin comfy-kitchen); KITCHEN=${KITCHEN:-comfy-kitchen==0.2.31}
mkdir -p .whl
rm -f .whl/comfy_aimdo-* .whl/comfy_kitchen-* .whl/torchsde-* .whl/trampoline-*
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64)
DL=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl)
"${DL[@]}" --implementation cp "${PLAT[@]}" "$AIMDO"
"${DL[@]}" --implementation py --abi none --platform any "$KITCHEN" torchsde==0.2.6 trampoline==0.1.2

for w in diffusers yunchang; do
    ls .whl/${w}-*.whl >/dev/null 2>&1 || echo "note: .whl has no $w wheel (the pack's own; the GPU image lacks it)" >&2
done

# --- ignored by git (worktrees share the common git dir)
EXC="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$EXC")"
for p in /.comfy/ /.whl/; do grep -qxF "$p" "$EXC" 2>/dev/null || echo "$p" >> "$EXC"; done

bytes=$(du -sb .comfy .whl | awk '{s += $1} END {print s}')
mib=$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}')
echo ".comfy $(du -sh .comfy | cut -f1), .whl $(du -sh .whl | cut -f1): $mib MiB together (limit $LIMIT_MIB MiB)"
ls .whl
awk -v b="$bytes" -v l="$LIMIT_MIB" 'BEGIN {exit !(b <= l * 1048576)}' || { echo "over $LIMIT_MIB MiB" >&2; exit 1; }
