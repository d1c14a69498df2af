#!/usr/bin/env bash
# The paper's 7B runs: a training slice (or SLICES slices of one multislice
# queued resource) and an eval slice, each kept going by `tpu supervise`
# (prints the commands with DRY_RUN=1):
#   BUCKET=gs://my-bucket ZONE=us-east5-a ACCEL=v5p-16 VARIANT=adamw LR=1e-5 \
#     [BASE=llama3_1_8b|olmo2_7b|qwen2_5_7b|qwen3_8b|moonlight_16b_a3b] \
#     [SLICES=2] [PROVISIONING=spot|reserved|on-demand|best-effort] \
#     launch/llama2_7b_metamath.sh
# BASE (default Llama-2-7B) is the config's base=, passed to the training and
# the eval config alike (the eval labels the run with the base's pretraining
# optimizer); runs of another base go to $BUCKET/runs/BASE-VARIANT[-lrLR].
# Weights and tokenizer: the config's default, meta-llama/Llama-2-7b-hf at a
# pinned commit, downloaded from the Hugging Face Hub by every worker (gated:
# accept Meta's license on the Hub and log in here with `hf auth login`; the
# token file, HF_TOKEN_FILE, default ~/.cache/huggingface/token, is copied to
# the workers by scp). Datasets: `python -m optconsist_jax.data.fetch` on every
# worker (files already there are kept). Only $BUCKET/data/heldout_text.jsonl
# (the eval's LM-loss documents; not on the Hub) is copied from the bucket.
set -euo pipefail
: "${BUCKET:?set BUCKET=gs://...}" "${ZONE:?set ZONE}"
ACCEL=${ACCEL:-v5p-16}; VARIANT=${VARIANT:-adamw}; LR=${LR:-}; SLICES=${SLICES:-1}
BASE=${BASE:-}
EVAL_ACCEL=${EVAL_ACCEL:-v5p-8}; PROVISIONING=${PROVISIONING:-spot}
# No new step for this long: save every worker's stacks, restart (0: off). An
# eval job logs a step per checkpoint, and evaluating one takes a while.
HANG_TIMEOUT=${HANG_TIMEOUT:-3600}; EVAL_HANG_TIMEOUT=${EVAL_HANG_TIMEOUT:-14400}
RUN="${BASE:-7b}-${VARIANT}${LR:+-lr$LR}"; NAME="ft-${RUN,,}"; NAME=${NAME//[^a-z0-9-]/-}
ARG="${VARIANT}${LR:+,lr=$LR}${BASE:+,base=$BASE}"
DRY=${DRY_RUN:+--dry-run}
T="$(dirname "$0")/tpu.sh"
COMMON=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})
WORKDIR="$BUCKET/runs/$RUN"
TOKEN_FILE=${HF_TOKEN_FILE:-$HOME/.cache/huggingface/token}
TOKEN=(); [ -f "$TOKEN_FILE" ] && TOKEN=(--hf-token-file="$TOKEN_FILE")

# The eval slice: evaluate --watch scores each checkpoint as it lands in
# $WORKDIR; recreated and restarted like the training slice.
EVAL=(supervise --name="$NAME-eval" "${COMMON[@]}" --accelerator-type="$EVAL_ACCEL"
  --queued --provisioning="$PROVISIONING" --fetch=gsm8k,hellaswag,arc,winogrande "${TOKEN[@]}"
  --stage="$BUCKET/data/heldout_text.jsonl=." --module=optconsist_jax.evaluate --job=eval
  --config="configs/llama2_7b_metamath_eval.py${BASE:+:base=$BASE}" --arg=--watch
  --workdir="$WORKDIR"
  --hang-timeout="$EVAL_HANG_TIMEOUT")
# Training: a reclaimed slice is created again (install + fetch) and the run
# resumes from its last checkpoint in $WORKDIR; a run stopped by SIGTERM
# (exit 75) or hung (no new step for HANG_TIMEOUT s; stacks in
# $WORKDIR/hangs/) is restarted. Ends with the job's exit code (0 done,
# 2 refused input, 3 NaN, 74 save failed).
TRAIN=(supervise --name="$NAME" "${COMMON[@]}" --accelerator-type="$ACCEL"
  --num-slices="$SLICES" --queued --provisioning="$PROVISIONING" --fetch=metamathqa
  "${TOKEN[@]}" --config="configs/llama2_7b_metamath.py:$ARG" --workdir="$WORKDIR"
  --hang-timeout="$HANG_TIMEOUT")
echo "logs:   $T logs --name=$NAME ${COMMON[*]} --num-slices=$SLICES"
echo "delete: $T delete --name=$NAME ${COMMON[*]} --num-slices=$SLICES --queued; $T delete --name=$NAME-eval ${COMMON[*]} --queued"
if [ -n "$DRY" ]; then
  "$T" "${EVAL[@]}" $DRY
  exec "$T" "${TRAIN[@]}" $DRY
fi
EVAL_LOG="$NAME-eval.supervise.log"
"$T" "${EVAL[@]}" > "$EVAL_LOG" 2>&1 &
EVAL_PID=$!
echo "eval slice supervised in the background (pid $EVAL_PID): $EVAL_LOG"
set +e
"$T" "${TRAIN[@]}"; rc=$?
echo "training supervision ended ($rc); waiting for the eval slice ($EVAL_LOG)"
wait "$EVAL_PID"; erc=$?
echo "eval supervision ended ($erc); results: $WORKDIR/eval/results.jsonl"
[ "$rc" -ne 0 ] && exit "$rc"
exit "$erc"
