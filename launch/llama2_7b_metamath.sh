#!/usr/bin/env bash
# The paper's 7B runs on one slice each, plus an eval slice (prints with DRY_RUN=1);
# training restarts itself after a preemption (tpu supervise).
#   BUCKET=gs://my-bucket ZONE=us-east5-a ACCEL=v5p-16 VARIANT=adamw LR=1e-5 \
#     launch/llama2_7b_metamath.sh
# Weights and tokenizer: the config's default, meta-llama/Llama-2-7b-hf at a
# pinned commit, downloaded from the Hugging Face Hub by every worker (gated:
# accept Meta's license on the Hub and log in here with `hf auth login`; the
# token file, HF_TOKEN_FILE, default ~/.cache/huggingface/token, is copied to
# the workers by scp). Datasets: `python -m optconsist_jax.data.fetch` on every
# worker (files already there are kept). Only $BUCKET/data/heldout_text.jsonl
# (the eval's LM-loss documents; not on the Hub) is copied from the bucket.
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
TOKEN_FILE=${HF_TOKEN_FILE:-$HOME/.cache/huggingface/token}
TOKEN=(); [ -f "$TOKEN_FILE" ] && TOKEN=(--hf-token-file="$TOKEN_FILE")

"$T" create --name="$NAME-eval" "${COMMON[@]}" --accelerator-type="$EVAL_ACCEL" \
  --queued --provisioning="$PROVISIONING" $DRY
"$T" install --name="$NAME-eval" "${COMMON[@]}" $DRY
"$T" fetch --name="$NAME-eval" "${COMMON[@]}" --data=gsm8k,hellaswag,arc,winogrande --dest=. \
  "${TOKEN[@]}" $DRY
"$T" stage --name="$NAME-eval" "${COMMON[@]}" --src="$BUCKET/data/heldout_text.jsonl" --dest=. $DRY
"$T" eval --name="$NAME-eval" "${COMMON[@]}" --config=configs/llama2_7b_metamath_eval.py --arg=--watch \
  --workdir="$WORKDIR" $DRY
echo "logs:   $T logs --name=$NAME ${COMMON[*]}"
echo "delete: $T delete --name=$NAME ${COMMON[*]} --queued; $T delete --name=$NAME-eval ${COMMON[*]} --queued"
# Training, supervised from this machine until it finishes: a Spot slice that
# is reclaimed is created again (install + fetch) and the run resumes from its
# last checkpoint in $WORKDIR; a run stopped by SIGTERM (exit 75) is restarted.
# Ends with the job's exit code (0 done, 2 refused input, 3 NaN, 74 save failed).
exec "$T" supervise --name="$NAME" "${COMMON[@]}" --accelerator-type="$ACCEL" \
  --queued --provisioning="$PROVISIONING" --fetch=metamathqa "${TOKEN[@]}" \
  --config="configs/llama2_7b_metamath.py:$ARG" --workdir="$WORKDIR" $DRY
