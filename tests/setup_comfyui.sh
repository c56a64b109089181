#!/usr/bin/env bash
# Prepare the real ComfyUI (v0.19.3) that the integration tier runs against: extract the reference
# tarballs (ComfyUI, musubi-tuner) from ../shared/reference outside the repository (once) and install ComfyUI's Python
# requirements, without torch (the test venv keeps its pinned build), into the given interpreter.
# Prints the folder to use as COMFYUI_ROOT; everything else goes to stderr.
#   root=$(bash tests/setup_comfyui.sh .venv/bin/python)
set -euo pipefail
python="${1:-python3}"
pack="$(cd "$(dirname "$0")/.." && pwd)"
shared="${SPEEDKIT_SHARED:-$pack/../shared}"
dest="${SPEEDKIT_REF_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/speedkit-ref}"
tarball="$shared/reference/ComfyUI-v0.19.3.tar.gz"
if [ ! -f "$dest/ComfyUI/main.py" ]; then
    if [ ! -f "$tarball" ]; then
        echo "setup_comfyui: $tarball not found; set SPEEDKIT_SHARED to the folder holding reference/, or clone ComfyUI v0.19.3 and set COMFYUI_ROOT yourself (README, Development)" >&2
        exit 2
    fi
    mkdir -p "$dest"
    tar -xzf "$tarball" -C "$dest"
fi
# musubi-tuner v0.3.4 beside it: the Musubi tests check every command against its real argparse
# and save code (tests/conftest.py points MUSUBI_TUNER_ROOT here when it is unset)
musubi_tar="$shared/reference/musubi-tuner-v0.3.4.tar.gz"
if [ ! -d "$dest/musubi-tuner/src" ] && [ -f "$musubi_tar" ]; then
    mkdir -p "$dest"
    tar -xzf "$musubi_tar" -C "$dest"
fi
if ! "$python" -c "import comfyui_frontend_package, sqlalchemy, alembic, torchsde, kornia, comfy_aimdo" 2>/dev/null; then
    grep -vE '^(torch|torchvision|torchaudio)([<>=!~ ].*)?$' "$dest/ComfyUI/requirements.txt" > "$dest/requirements-without-torch.txt"
    "$python" -m pip install -q -r "$dest/requirements-without-torch.txt" >&2
fi
echo "$dest/ComfyUI"
