#!/usr/bin/env bash
# Runs the GPU server tier once per server setting, the settings side by side (one pytest and one
# ComfyUI server each, own asset folder), so the four settings fit one sitting on one GPU.
#   bash tests/gpu_server/run_settings.sh [setting ...] [-- extra pytest arguments]
# Settings: defaults highvram disable-dynamic-vram disable-cuda-malloc (default: all four).
# Logs go to ${LOG_DIR:-${OUT:-/tmp}}/tier_<setting>.log (each test's time and any failure's reason
# as it ends), each server's log to server_<setting>.log beside it; the summary line of each is
# printed. TIER_TIMEOUT_S stops every pytest after that many seconds (0: never), so a run under a
# wall-clock limit still brings its logs back. TIER_K narrows the tests (a pytest -k expression,
# e.g. TIER_K="not cancel"; a -k among the extra arguments would replace the setting's).
# Timing cases (Cancel within 2 s) share the GPU with the other settings' servers here; run one
# setting alone to time it undisturbed. Each server takes the GPU's memory as its own (dynamic
# VRAM, automatic batches), so on a GPU under 120 GiB (an 80 GB H100) two servers side by side
# run each other out of memory: there the settings run one after another (SEQUENTIAL=1 forces
# that anywhere).
set -u
settings=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do settings+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#settings[@]} -eq 0 ] && settings=(defaults highvram disable-dynamic-vram disable-cuda-malloc)
logs="${LOG_DIR:-${OUT:-/tmp}}"
mkdir -p "$logs"
assets="${SPEEDKIT_GPU_ASSETS:-/tmp/speedkit_gpu_assets}"
# The random-weight checkpoints (a full-size SDXL among them) are built once, then linked.
dirs=()
for s in "${settings[@]}"; do dirs+=("${assets}_$s"); done
python3 tests/gpu_server/shared_assets.py "${assets}_shared" "${dirs[@]}" || exit 1
total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)
sequential="${SEQUENTIAL:-0}"
if [ "${total_mib:-0}" -lt 122880 ] 2>/dev/null; then sequential=1; fi
[ "$sequential" = 1 ] && [ ${#settings[@]} -gt 1 ] && echo "settings run one after another (GPU memory ${total_mib:-?} MiB)"
pids=()
rcs=()
for s in "${settings[@]}"; do
    SPEEDKIT_GPU_ASSETS="${assets}_$s" \
        timeout "${TIER_TIMEOUT_S:-0}" python3 -m pytest -v -rfE -p no:cacheprovider --basetemp="/tmp/speedkit_tier_$s" \
        tests/gpu_server -k "$s${TIER_K:+ and ($TIER_K)}" "$@" >"$logs/tier_$s.log" 2>&1 &
    pids+=($!)
    if [ "$sequential" = 1 ]; then wait "$!"; rcs+=($?); else rcs+=(""); fi
done
status=0
for i in "${!pids[@]}"; do
    rc="${rcs[$i]}"
    if [ -z "$rc" ]; then wait "${pids[$i]}"; rc=$?; fi
    [ "$rc" = 0 ] || status=1
    s="${settings[$i]}"
    echo "$s: $(tail -n 1 "$logs/tier_$s.log")"
    for log in /tmp/speedkit_tier_"$s"/server-*/comfyui.log; do
        [ -f "$log" ] && cp "$log" "$logs/server_$s.log"
    done
done
exit $status
