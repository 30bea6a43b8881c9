#!/usr/bin/env bash
# The generation benchmark on a CUDA machine: a RedPajama-INCITE-Chat-3B-shaped GPT-NeoX (32 layers,
# hidden 2560, random bf16 weights) served at tp=1 and tp=2, tokens/s at N=1/16/64 against a static
# Hugging Face batch on the same GPU, plus the mixed-length workload. Writes var/bench/generation-gpu.json
# (the shape of var/bench/generation.json; tp=2 keys start with tp2_), then speculative decoding's grounded rows
# (var/bench/speculation-gpu.json).
#
#   make setup && tests/bench/gpu.sh            # needs 2 GPUs for tp=2 (one is enough with NUM_SHARD="1")
#
# The CPU wheel of torch that `make setup` pins has no CUDA: this script installs the CUDA build of the same
# torch version into .venv first (TORCH_INDEX overrides where it comes from).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
NUM_SHARD=${NUM_SHARD:-"1 2"}
CONCURRENCY=${CONCURRENCY:-"1 16 64"}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}

test -x "$PY" || { echo "run 'make setup' first" >&2; exit 2; }
command -v nvidia-smi >/dev/null || { echo "no nvidia-smi: this script needs a CUDA machine" >&2; exit 2; }
nvidia-smi --query-gpu=index,name,memory.total --format=csv
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    version=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
    echo "installing torch==$version with CUDA from $TORCH_INDEX"
    "$PY" -m pip install --quiet --force-reinstall --no-deps "torch==$version" --index-url "$TORCH_INDEX"
fi
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
for n in $NUM_SHARD; do
    if [ "$n" -gt "$gpus" ]; then echo "tp=$n needs $n GPUs, this machine has $gpus" >&2; exit 2; fi
done
# shellcheck disable=SC2086
"$PY" tests/bench/bench_generation.py --models redpajama-3b-shape --device cuda --dtype bfloat16 \
    --num-shard $NUM_SHARD --concurrency $CONCURRENCY --skip scaling chunked memory --area generation-gpu "$@"
# speculative decoding drafted from the prompt on make eval's grounded prompts (the default model, whose answers
# copy its passages; random weights would not), on the GPU: spec against off at N=1 and N=16
exec "$PY" tests/bench/bench_speculation.py --runners transformers --no-peer --nightcap-args "--device cuda" \
    --area speculation-gpu
