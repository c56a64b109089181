#!/usr/bin/env bash
# Copy what the GPU server tier and the server benchmarks need onto a machine without network
# into the ignored folder .gpu/ of this checkout (run here, from the pack folder; .gpu then
# travels with the checkout): the ComfyUI v0.19.3 tarball, the wheels of ComfyUI's Python
# dependencies a bare CUDA image lacks, ssitu's Ultimate SD Upscale v1.7.1 (the baseline of
# benchmarks/server_usdu_train_bench.py) and the real RealESRGAN_x4plus weights.
set -euo pipefail
cd "$(dirname "$0")/../.."
shared="${SPEEDKIT_SHARED:-../shared}"
mkdir -p .gpu/wheels .gpu/models
cp "$shared/reference/ComfyUI-v0.19.3.tar.gz" "$shared/reference/ComfyUI_UltimateSDUpscale-v1.7.1.tar.gz" .gpu/
cp "$shared"/reference/wheels-cp312/*.whl .gpu/wheels/
cp "$shared/models/RealESRGAN_x4plus.safetensors" .gpu/models/
du -sh .gpu
