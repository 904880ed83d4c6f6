#!/bin/bash
# Host-side profile of a short LoRA SFT run on one GPU (Qwen2.5-0.5B architecture, random init, bf16):
# where does the time of a training step go? Writes OUT/train-lora.prof (cProfile) and the run's log.
#   bash bench/profile_train_gpu.sh OUT_DIR [extra key=value ...]
set -euo pipefail
OUT=${1:?usage: profile_train_gpu.sh OUT_DIR [key=value ...]}; shift
WORK=/tmp/tunesmith-profile
mkdir -p "$WORK" "$OUT"
python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from train_gpu_smoke import build_model; build_model(Path('$WORK/model'), Path('.device/qwen-tok'))"
python3 -m cProfile -o "$OUT/train-lora.prof" -m tunesmith.cli train \
  model_name_or_path=$WORK/model stage=sft do_train=true dataset=.device/alpaca_en_demo.json template=qwen \
  cutoff_len=1024 output_dir=$WORK/out overwrite_output_dir=true per_device_train_batch_size=8 \
  learning_rate=1e-4 max_steps=40 logging_steps=5 save_strategy=no plot_loss=false bf16=true \
  data_cache_dir=$WORK/cache finetuning_type=lora lora_target=all "$@" > "$OUT/train-lora.log" 2>&1
tail -5 "$OUT/train-lora.log"
cp "$WORK/out/trainer_log.jsonl" "$OUT/trainer_log-lora.jsonl"
