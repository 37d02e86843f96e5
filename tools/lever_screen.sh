#!/usr/bin/env bash
# Issue 20's lever screen, one seed, by hand (what the scarcity study does, one lever at a time):
#   tools/lever_screen.sh SHARDS OUT [SEED] [LEVER ...]
# SHARDS: pbc-dev at 32 px (python tools/shard.py pbc=../shared/data/pbc-dev out=SHARDS size=32 seed=0).
# Monocytes and eosinophils of the train split cut to 20 (scarce_seed = SEED). Every classifier is the study's
# (small_resnet, 1,200-step cap, patience 4, batch 64) with the rival's recipe (logit_adjust + aug2, the scarcity
# study's search winner); each lever's GAN cells top the classes up (balance=max) unless the lever says otherwise.
# Each step is skipped when its output is already there (rerun to continue). Results: OUT/cls/*/results.json;
# python tools/lever_table.py OUT prints the table.
set -euo pipefail
SHARDS=$1; OUT=$2; SEED=${3:-0}; shift $(( $# >= 3 ? 3 : $# ))
LEVERS=${*:-rival base curated nobalance long long_curated count20 share gsr utlo}
PY=${PYTHON:-python}
CUT="scarce={monocyte:20,eosinophil:20}"
GAN=(model.width=16 batch_size=32 flip=true "diffaug=[color,translation]" ema=0.999 precision=fp32 log_every=50
     sample_every=0 ckpt_every=500 progress=false tensorboard=false "$CUT" seed=$SEED)
CLS=(arch=small_resnet steps=1200 batch_size=64 eval_every=100 patience=4 log_every=100 ckpt_every=1000
     precision=fp32 progress=false "$CUT" seed=$SEED)
RIVAL=(loss=logit_adjust augment=aug2); RECIPE=()   # the rival's recipe; a lever with its own sets RECIPE=(...) before cls
mkdir -p "$OUT/gan" "$OUT/syn" "$OUT/cls"

gan() {  # NAME MODEL EXTRA...
  local name=$1 model=$2; shift 2
  $PY -m hpcgan.train shards="$SHARDS" run_dir="$OUT/gan/$name" model="$model" "${GAN[@]}" "$@"
}
syn() {  # NAME GAN [HOW...] (default: balance=max, the top-up)
  local name=$1 run=$2; shift 2
  local how=("$@"); [ $# -gt 0 ] || how=(balance=max shards="$SHARDS")
  [ -f "$OUT/syn/$name/manifest.json" ] || $PY tools/generate.py run="$OUT/gan/$run" out="$OUT/syn/$name" \
    png=false progress=false seed=$SEED "${how[@]}"
}
cls() {  # NAME REGIME [SYNTHETIC] EXTRA...
  local name=$1 regime=$2; shift 2
  local syn=(); if [ $# -gt 0 ] && [ "${1#syn=}" != "$1" ]; then syn=(synthetic="$OUT/syn/${1#syn=}"); shift; fi
  local recipe=("${RIVAL[@]}"); if [ ${#RECIPE[@]} -gt 0 ]; then recipe=("${RECIPE[@]}"); fi
  $PY tools/classify.py shards="$SHARDS" regime="$regime" ${syn[@]+"${syn[@]}"} "${CLS[@]}" "${recipe[@]}" \
    tag="$name" out="$OUT/cls/$name" "$@"
}

# the GANs some levers share (a finished one is "already finished")
base_gan() { gan cellgan cellgan steps=1900 balance_classes=true; }
long_gan() { gan cellgan-long cellgan steps=100000 time_budget_s=600 balance_classes=true; }

for lever in $LEVERS; do
  echo "== $lever $(date +%T)"
  case $lever in
    rival)     cls rival original ;;
    base)      base_gan
               syn cellgan cellgan; cls base original+synthetic syn=cellgan ;;
    curated)   base_gan; syn cellgan-curated cellgan balance=max shards="$SHARDS" curate=true; cls curated original+synthetic syn=cellgan-curated ;;
    nobalance) gan cellgan-nobal cellgan steps=1900 balance_classes=false
               syn cellgan-nobal cellgan-nobal; cls nobalance original+synthetic syn=cellgan-nobal ;;
    long)      long_gan
               syn cellgan-long cellgan-long; cls long original+synthetic syn=cellgan-long ;;
    long_curated) long_gan; syn cellgan-long-curated cellgan-long balance=max shards="$SHARDS" curate=true
               cls long_curated original+synthetic syn=cellgan-long-curated ;;
    count20)   base_gan; syn cellgan-pc20 cellgan per_class=20
               cls count20 original+synthetic syn=cellgan-pc20 synthetic_count=20 ;;
    share)     base_gan; RECIPE=(sampling=balanced augment=aug2); cls share original+synthetic syn=cellgan real_share=0.5
               RECIPE=() ;;
    gsr)       gan cellgan-gsr cellgan steps=1900 balance_classes=true model.gsr_weight=0.5
               syn cellgan-gsr cellgan-gsr; cls gsr original+synthetic syn=cellgan-gsr ;;
    utlo)      gan cellgan-utlo cellgan steps=1900 balance_classes=true model.class_from=16
               syn cellgan-utlo cellgan-utlo; cls utlo original+synthetic syn=cellgan-utlo ;;
    *) echo "unknown lever $lever"; exit 2 ;;
  esac
done
