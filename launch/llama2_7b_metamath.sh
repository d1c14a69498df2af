#!/usr/bin/env bash
# The paper's 7B runs on one slice each, plus an eval slice (prints with DRY_RUN=1).
#   BUCKET=gs://my-bucket ZONE=us-east5-a ACCEL=v5p-16 VARIANT=adamw LR=1e-5 \
#     launch/llama2_7b_metamath.sh
# Needs gs://.../llama-2-7b-hf (HF folder with tokenizer.model),
# gs://.../data/{MetaMathQA-395K.json,gsm8k_test.jsonl,...} in $BUCKET.
set -euo pipefail
: "${BUCKET:?set BUCKET=gs://...}" "${ZONE:?set ZONE}"
ACCEL=${ACCEL:-v5p-16}; VARIANT=${VARIANT:-adamw}; LR=${LR:-}
EVAL_ACCEL=${EVAL_ACCEL:-v5p-8}; PROVISIONING=${PROVISIONING:-spot}
RUN="7b-${VARIANT}${LR:+-lr$LR}"; NAME="ft-${RUN//[^a-z0-9-]/-}"; NAME=${NAME,,}
ARG="${VARIANT}${LR:+,lr=$LR}"
DRY=${DRY_RUN:+--dry-run}
T="$(dirname "$0")/tpu.sh"
COMMON=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})
WORKDIR="$BUCKET/runs/$RUN"

"$T" create --name="$NAME" "${COMMON[@]}" --accelerator-type="$ACCEL" \
  --queued --provisioning="$PROVISIONING" $DRY
"$T" install --name="$NAME" "${COMMON[@]}" $DRY
"$T" stage --name="$NAME" "${COMMON[@]}" --src="$BUCKET/llama-2-7b-hf" --dest=. $DRY
"$T" stage --name="$NAME" "${COMMON[@]}" --src="$BUCKET/data/MetaMathQA-395K.json" --dest=. $DRY
"$T" train --name="$NAME" "${COMMON[@]}" --config="configs/llama2_7b_metamath.py:$ARG" \
  --workdir="$WORKDIR" $DRY

"$T" create --name="$NAME-eval" "${COMMON[@]}" --accelerator-type="$EVAL_ACCEL" \
  --queued --provisioning="$PROVISIONING" $DRY
"$T" install --name="$NAME-eval" "${COMMON[@]}" $DRY
"$T" stage --name="$NAME-eval" "${COMMON[@]}" --src="$BUCKET/llama-2-7b-hf" --dest=. $DRY
"$T" stage --name="$NAME-eval" "${COMMON[@]}" --src="$BUCKET/data/*" --dest=. $DRY
"$T" eval --name="$NAME-eval" "${COMMON[@]}" --config=configs/llama2_7b_metamath_eval.py --arg=--watch \
  --workdir="$WORKDIR" $DRY
echo "logs:   $T logs --name=$NAME ${COMMON[*]}"
echo "delete: $T delete --name=$NAME ${COMMON[*]} --queued; $T delete --name=$NAME-eval ${COMMON[*]} --queued"
