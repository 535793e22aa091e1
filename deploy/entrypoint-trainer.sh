#!/bin/sh
# The retraining job's entry point inside the image (installed as multvae-trainer).
#
#   multvae-trainer bootstrap [retrain flags...]  train only when MODEL_DIR has no CURRENT
#                                                 (docker compose up: serve on a fresh machine)
#   multvae-trainer retrain [retrain flags...]    always retrain and gate (cron, CronJob)
#
# Data: $MULTVAE_DATA names the interaction file (or Netflix directory) inside the container.
# Unset, the job uses the embedded demo: synthetic data generated once into
# $MULTVAE_DEMO_DATA (default /data/demo-small.csv) and a short schedule (--epochs 20) that
# later flags override. Set but missing is an error, never a silent fall-back to the demo.
# $MULTVAE_RETRAIN_ARGS adds flags (e.g. "--preset ml-20m"); arguments after the mode too.
#
# Exit codes are multvae retrain's: 0 promoted (or bootstrap had nothing to do),
# 1 failed, 2 usage, 3 kept (the gate refused; the current version keeps serving).
set -eu

mode="${1:-retrain}"
[ "$#" -gt 0 ] && shift

model_dir="${MULTVAE_MODEL_DIR:-/models}"
demo="${MULTVAE_DEMO_DATA:-/data/demo-small.csv}"
data="${MULTVAE_DATA:-}"
demo_flags=""

case "$mode" in
    bootstrap | retrain) ;;
    *)
        echo "multvae-trainer: unknown mode '$mode'; use 'bootstrap' or 'retrain'" >&2
        exit 2
        ;;
esac

if [ "$mode" = bootstrap ] && [ -s "$model_dir/CURRENT" ]; then
    echo "multvae-trainer: $model_dir already serves $(cat "$model_dir/CURRENT"); nothing to do" \
        "(run 'multvae-trainer retrain' to retrain)"
    exit 0
fi

if [ -z "$data" ]; then
    data="$demo"
    demo_flags="--epochs 20"
    if [ ! -s "$data" ]; then
        echo "multvae-trainer: MULTVAE_DATA is unset: generating demo data into $data"
        multvae generate --shape small --out "$data"
    fi
elif [ ! -e "$data" ]; then
    echo "multvae-trainer: MULTVAE_DATA=$data does not exist in the container;" \
        "mount the data directory at /data (MULTVAE_DATA_DIR in docker compose)" >&2
    exit 1
fi

# The flag variables are split into words on purpose (several flags in one variable); on
# argparse's "last one wins", MULTVAE_RETRAIN_ARGS and the arguments override the demo's.
# shellcheck disable=SC2086
exec multvae retrain --data "$data" --model-dir "$model_dir" --quiet \
    $demo_flags ${MULTVAE_RETRAIN_ARGS:-} "$@"
