#!/usr/bin/env bash
# The GPU check of the solver's time targets (issue 3: ALPS at most 3x SparseGPT's time per layer,
# alps-simple at most 1x), as one short command for a GPU machine lent through the `device` tool.
#
# That machine runs its own Python (torch, safetensors; no GGUF support, none of our data, no Prefect), so
# the real layer problems are captured here first, into an ignored file that the run carries (55 MB: the
# seven linear layers of blocks 0 and 29 of SmolLM2-135M, 32 x 512 tokens of C4 train; a tree travels
# only up to 64 MiB, so carry this one file):
#
#   python bench/layer_bench.py --data-dir ../shared/data --nsamples 32 --seqlen 512 --blocks 0 29 \
#       --layers q_proj k_proj v_proj o_proj gate_proj up_proj down_proj --methods sparsegpt --patterns 0.7 \
#       --save-problems bench/.problems/smollm2-c4-32x512-b0-29.safetensors --output /tmp/capture.json
#
# then, through the device tool: run(command="bash bench/gpu_check.sh",
# carry=["bench/.problems/smollm2-c4-32x512-b0-29.safetensors"], timeout_s=420): on this machine's CPU the
# whole check takes 3.3 minutes, and the lease's 15 minutes include starting the machine. It writes JSON
# and logs under $OUT. The same problems solved here on the CPU (`bash bench/gpu_check.sh PROBLEMS cpu`)
# give the reference the GPU's errors should match.
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
