#!/usr/bin/env bash
# GPU checks in one go: the CUDA tests, then perturb + restore and whole-Trainer-step overhead on the GPU.
#
# Usage (from the repository root, on a machine with one CUDA GPU and torch/transformers/accelerate):
#     bash benchmarks/gpu_checks.sh [OUTPUT_DIR]     # default gpu_results/; about 5 minutes on an H100
# Every log lands in OUTPUT_DIR; the exit status is that of the CUDA tests.
set -uo pipefail
out=${1:-gpu_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$python" -c "import torch, transformers, accelerate; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| accelerate', accelerate.__version__, '| cuda', torch.version.cuda)"
} 2>&1 | tee "$out/env.txt"

"$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
status=${PIPESTATUS[0]}

"$python" benchmarks/perturb.py --device cuda --repeats 21 2>&1 | tee "$out/perturb_bert_base.log"
for model in bert-base minilm; do
  "$python" benchmarks/overhead.py --model "$model" --batch 32 --seq 128 --bf16 --steps 12 --rounds 3 2>&1 \
    | tee "$out/overhead_${model}_bf16.log"
done
"$python" benchmarks/overhead.py --model cnn --batch 256 --steps 12 --rounds 3 2>&1 | tee "$out/overhead_cnn_fp32.log"
exit "$status"
