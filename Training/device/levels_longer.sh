#!/bin/bash
# Issue 21, session 17: recipe D (lumbar-levels v0.3.0) for longer, five fold models and the final
# model side by side on a lent GPU. Run from the repository root on the device machine, with
# .devdata/levels-1.4mm.pkl.xz carried (spine_levels.py pack). No probe: session 15 measured the
# step there (6 jobs at once: 0.19 s batch to batch). A job stopped by --max-minutes comes back
# as last.pt, for `spine_levels.py cv --resume` on a GPU machine (the random state it saved is
# a CUDA generator's; not tried on the CPU).
set -u
export PYTHONPATH=SpineKneeSeg:Training PYTHONUNBUFFERED=1
STEPS=${STEPS:-2200}
NAME=${NAME:-E}
EXTRA=${EXTRA:-}  # more spine_levels.py options, e.g. "--seed 1"
# the packed scans (carried); at 1.0 mm in-plane: PACK=.devdata/levels-1.0mm.pkl.xz (34 MB, made by
# `spine_levels.py pack --spacing-mm 1.0 --out ...`) and EXTRA="--spacing-mm 1.0 --canvas 288
# --shift-px 34 --warp-px 4.2" (recipe D's field of view and augmentation in mm, not pixels); recipe D
# with soft targets (session 19, level_ceiling.py): PACK=.devdata/levels-1.4mm-soft.pkl.xz (20 MB,
# `spine_levels.py pack --targets soft --spacing-mm 1.4 --out ...`) and EXTRA="--targets soft"
PACK=${PACK:-.devdata/levels-1.4mm.pkl.xz}
MAX_MIN=${MAX_MIN:-7.5}
RUN=${RUN:-/tmp/run}
OUT=${OUT:-/tmp/out}
# recipe D's network; NET overrides it (session 20's suggestion at 1.0 mm: "levels": 7, with
# --canvas 320 in EXTRA, a multiple of 2^6)
D=${NET:-'{"levels": 6, "base_channels": 16, "max_channels": 64, "activation": "elu", "norm": "batch"}'}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
date +%s
python3 Training/level_parallel.py --packed "$PACK" --out "$RUN" --steps "$STEPS" \
    --recipe "$NAME=--batch-size 32 --network '$D' --max-minutes $MAX_MIN $EXTRA" -- --device "${DEVICE:-cuda}" --threads 1
date +%s
for job in fold0 fold1 fold2 fold3 fold4 final; do
    mkdir -p "$OUT/$NAME/$job"
    if [ -f "$RUN/$NAME/$job/final.pt" ]; then cp "$RUN/$NAME/$job/final.pt" "$OUT/$NAME/$job/"
    else cp "$RUN/$NAME/$job/last.pt" "$OUT/$NAME/$job/" 2>/dev/null || echo "$job: no model"; fi
done
tar czf "$OUT/meta.tgz" -C "$RUN" plan.json logs "$NAME/folds.json"
tail -n 2 "$RUN"/logs/*.log
ls -la "$OUT"/$NAME/*
