#!/usr/bin/env bash
# The GPU measurements of the README's performance table, each written as JSON into RESULTS:
#   sampling at SD-1.5 size (512 px, bf16, 25 DDIM steps, batch 4, CFG 3) against StableDiffusionPipeline, with a
#   profile of both calls (SDPA; xFormers too where installed); the SD-1.5-size training step (256 px, bf16 autocast,
#   batch $BATCH) against diffusers' step with counted FLOPs and MFU: SDPA, xFormers, channels_last, torch.compile;
#   the tiny trainer on CUDA in bf16 for 300 steps.
#
#   benchmarks/gpu.sh RESULTS            # on a CUDA machine (about 15 min on one H100/H200)
#   benchmarks/gpu.sh RESULTS --smoke    # the same commands at tiny size on the CPU (about a minute): do they run?
#
# BATCH (default 32) sets the SD-1.5 training batch: the training benchmark holds four copies of the UNet with their
# AdamW states (about 55 GiB), so on an 80 GB card a batch of 32 at 256 px may not fit: BATCH=16.
# PYTHON (default: python) is the interpreter. A failed command is reported and the others still run; the exit
# status is the number of failures.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
R=$1
SMOKE=${2:-}
PY=${PYTHON:-python}
BATCH=${BATCH:-32}
mkdir -p "$R"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}

if [ "$SMOKE" = "--smoke" ]; then
  MODEL="--preset tiny --device cpu --dtype float32"
  SAMPLE="$MODEL --steps 2 --batch-size 2 --repeats 1"
  TRAIN="$MODEL --batch-size 4 --steps-per-round 1 --repeats 1 train.batch_size=4"
  COMPILE="--compile eager"  # dynamo without inductor's code generation: checks the wiring, not the speed
  TINY="train.max_steps=3 train.batch_size=8 train.mixed_precision=no"
  XFORMERS=no
elif [ -n "$SMOKE" ]; then
  echo "error: unknown option '$SMOKE' (only --smoke)" >&2
  exit 2
else
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device; run with --smoke to check the commands on the CPU" >&2
    exit 2
  fi
  MODEL="--preset sd15 --device cuda --dtype bfloat16"
  SAMPLE="$MODEL --resolution 512 --steps 25 --batch-size 4 --guidance 3 --repeats 5"
  TRAIN="$MODEL --resolution 256 --batch-size $BATCH --steps-per-round 5 --repeats 5"
  COMPILE="--compile"
  TINY="train.max_steps=300 train.mixed_precision=bf16"
  XFORMERS=$($PY -c "import importlib.util as u; print('yes' if u.find_spec('xformers') else 'no')")
fi

failures=0
step() {  # step NAME COMMAND...: run, keep its output in RESULTS/NAME.log, count failures
  local name=$1; shift
  echo "== $name: $*"
  local start=$SECONDS
  if "$@" > "$R/$name.log" 2>&1; then
    echo "   done in $((SECONDS - start)) s"
  else
    echo "   FAILED (exit $?) after $((SECONDS - start)) s; see $R/$name.log"
    failures=$((failures + 1))
  fi
}

step sample_sdpa $PY benchmarks/run.py sample $SAMPLE --profile --out "$R/sample_sdpa.json"
[ "$XFORMERS" = yes ] && step sample_xformers $PY benchmarks/run.py sample $SAMPLE --xformers --out "$R/sample_xformers.json"
step train_sdpa $PY benchmarks/run.py train $TRAIN --out "$R/train_sdpa.json"
[ "$XFORMERS" = yes ] && step train_xformers $PY benchmarks/run.py train $TRAIN --attention xformers --out "$R/train_xformers.json"
step train_channels_last $PY benchmarks/run.py train $TRAIN --channels-last --out "$R/train_channels_last.json"
step train_compile $PY benchmarks/run.py train $TRAIN $COMPILE --out "$R/train_compile.json"
step train_profile $PY benchmarks/run.py train $TRAIN --profile-steps 2 --repeats 1 --out "$R/train_profile.json"
step tiny_trainer $PY -m diffdis.cli.train train.output_dir="$R/tiny_trainer" $TINY train.eval_every=0 \
  train.validation_every=0 train.checkpointing_steps=0 train.report_to=none

echo "results in $R ($failures failed)"
exit $failures
