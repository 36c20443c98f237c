#!/usr/bin/env bash
# The solver's time on a GPU: the layer bench (ALPS, alps-simple and SparseGPT at six patterns) and the block
# bench, as one command for a GPU machine that has only torch and safetensors (no GGUF support, no data, no
# Prefect). The real layer problems are captured first on a machine with the whole stack, into one file
# (55 MB: the seven linear layers of blocks 0 and 29 of SmolLM2-135M, 32 x 512 tokens of C4 train):
#
#   python bench/layer_bench.py --data-dir ../shared/data --nsamples 32 --seqlen 512 --blocks 0 29 \
#       --layers q_proj k_proj v_proj o_proj gate_proj up_proj down_proj --methods sparsegpt --patterns 0.7 \
#       --save-problems bench/.problems/smollm2-c4-32x512-b0-29.safetensors --output /tmp/capture.json
#
# then, on the GPU machine, with that file beside the tree: bash bench/gpu_check.sh [PROBLEMS] [DEVICE]
# (about 3.3 minutes on a 2-core CPU). It writes JSON and logs under $OUT. The same problems solved on a CPU
# (DEVICE cpu) give the reference the GPU's errors should match.
set -uo pipefail
problems=${1:-bench/.problems/smollm2-c4-32x512-b0-29.safetensors}
device=${2:-cuda}
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
failed=0

"$python" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
    | tee "$out/environment.txt" || failed=1
# Each bench runs even if the other fails; the exit status says whether both did.
"$python" bench/layer_bench.py --problems "$problems" --device "$device" \
    --methods alps alps-simple sparsegpt --output "$out/layer_bench_$device.json" 2>&1 | tee "$out/layer_bench_$device.log" \
    || failed=1
"$python" bench/block_bench.py --problems "$problems" --device "$device" \
    --output "$out/block_bench_$device.json" 2>&1 | tee "$out/block_bench_$device.log" || failed=1
exit $failed
