#!/usr/bin/env bash
# GPU checks in one go: the CUDA tests, perturb + restore and whole-Trainer-step overhead (also LoRA's merged
# space), then DeepSpeed ZeRO-2 and FSDP2 (transformers' and accelerate's) with bf16 on the one GPU.
#
# Usage (from the repository root, on a machine with one CUDA GPU and torch/transformers/accelerate):
#     bash benchmarks/gpu_checks.sh [OUTPUT_DIR]     # default gpu_results/; about 8 minutes on an H100
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
"$python" benchmarks/overhead.py --model bert-base --batch 32 --seq 128 --bf16 --lora_r 8 --steps 12 --rounds 3 \
  --arms "SmoothOut filter/copy" "SmoothOut lora_merged" "Flat-LoRA law lora_merged" 2>&1 \
  | tee "$out/overhead_bert_base_lora_bf16.log"

# Scale-out paths on the one GPU, with bf16 (one process: the code paths and the master/shard checks; the
# cross-rank checks run on 2 CPU processes in tests/test_deepspeed.py and tests/test_fsdp.py).
launch=("$python" -m torch.distributed.run --standalone --nproc_per_node 1)
common=(--max_steps 6 --per_device_train_batch_size 8 --learning_rate 0.01 --report_to none --save_strategy no
  --disable_tqdm true --smoothout_strength 0.05 --seed 3 --bf16 true)
"${launch[@]}" tests/deepspeed_train.py --deepspeed recipes/configs/deepspeed_zero2.json --output_dir "$out/zero2" \
  "${common[@]}" 2>&1 | tail -n 20 | tee "$out/zero2_bf16.log"
cat "$out/zero2/deepspeed_result.json" 2>/dev/null | tee -a "$out/zero2_bf16.log"; echo
FSDP_TEST_SHARDS=1 "${launch[@]}" tests/fsdp_train.py --output_dir "$out/fsdp2" "${common[@]}" 2>&1 \
  | tail -n 20 | tee "$out/fsdp2_bf16.log"
cat "$out/fsdp2/fsdp_result.json" 2>/dev/null | tee -a "$out/fsdp2_bf16.log"; echo
# the same through accelerate's FSDP2 plugin (the model is sharded inside train)
FSDP_TEST_SHARDS=1 FSDP_TEST_ROUTE=accelerate "${launch[@]}" tests/fsdp_train.py --output_dir "$out/fsdp2_accelerate" \
  "${common[@]}" --fsdp full_shard --fsdp_config '{"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}' \
  2>&1 | tail -n 20 | tee "$out/fsdp2_accelerate_bf16.log"
cat "$out/fsdp2_accelerate/fsdp_result.json" 2>/dev/null | tee -a "$out/fsdp2_accelerate_bf16.log"; echo
exit "$status"
