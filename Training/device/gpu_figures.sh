#!/bin/bash
# Issue 25 part 5: the networks' GPU figures on a lent device, in about a minute. Run from the
# repository root on the device machine (nothing to carry: the registered weights are in the tree):
#   bash Training/device/gpu_figures.sh > $OUT/gpu_figures.txt
# Inference per task (batch-norm folded, channels-last, as the product runs), then training steps
# (the registered architecture, forward + loss + backward + Adam; no sampling or augmentation),
# in float32 and under bfloat16 autocast. Figures go to Training/README and the model cards.
set -eu
export PYTHONPATH=SpineKneeSeg PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 Testing/benchmarks/bench_networks.py --device cuda --batches 1 8 32 --runs 20
python3 Testing/benchmarks/bench_networks.py --device cuda --train --batches 8 32 --runs 10
python3 Testing/benchmarks/bench_networks.py --device cuda --train --amp --batches 8 32 --runs 10
