# Source on the GPU machine from the pack folder: `source tests/gpu_server/device_env.sh`.
# Installs the staged wheels (tests/gpu_server/stage_for_device.sh) into /tmp/site, extracts
# ComfyUI v0.19.3 to /tmp/comfyui and exports what the GPU server tier and the server
# benchmarks read: COMFYUI_ROOT, SPEEDKIT_TEST_MODELS, PYTHONPATH.
stage="${1:-.gpu}"
if [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$stage"/wheels/*.whl || return 1
fi
if [ ! -f /tmp/comfyui/ComfyUI/main.py ]; then
    mkdir -p /tmp/comfyui && tar -xzf "$stage"/ComfyUI-v0.19.3.tar.gz -C /tmp/comfyui || return 1
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export COMFYUI_ROOT=/tmp/comfyui/ComfyUI
export SPEEDKIT_TEST_MODELS="$PWD/$stage/models"
export PYTHONUNBUFFERED=1
