#!/usr/bin/env bash
# One prepared call on a GPU machine (16 cores, one H200), run from the repository root with
# MNIST in .mnist/ and the tomli-w wheel in .whl/ (neither is tracked):
#   1. the CUDA test (a synthesis on cuda), which stops the script if it fails;
#   2. on 6 CPU cores: the growth-budget ablation of NeST at 3,000 weights, 3 seeds, 60 epochs
#      (growth.max_epochs 4 and 12; the shipped 8 is bench/results/curves_lenet300_release);
#   3. on the GPU, beside it: the LeNet-5 curves at 30 epochs (L0 seeds 0-2; NeST and gradual
#      seeds 1-2, seed 0 of those is bench/results/curves_lenet5).
# Every run directory and log goes to $OUT/runs.tgz; runs cut off by the time limit are simply
# missing (finished ones are complete: compare reuses them).
set -u
LIMIT=${LIMIT:-450}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" runs
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi -L; nproc; python3 -c "import torch, nestsynth; print(torch.__version__, torch.cuda.is_available())"
timeout 120 python3 -m pytest -q -x tests/test_distributed.py -k cuda -p no:cacheprovider 2>&1 | tee runs/cuda_test.log
[ "${PIPESTATUS[0]}" = 0 ] || { tar czf "$OUT/runs.tgz" runs; exit 1; }
D=.mnist
L300=configs/lenet-300-100-mnist-sized.toml
L5=configs/lenet-5-mnist-sized.toml
for g in 4 12; do
  timeout $LIMIT python3 -m nestsynth.cli compare --data-dir $D --threads 1 --config $L300 --methods nest \
    --sizes 3000 --epochs 60 --seeds 3 --jobs 3 --device cpu --out runs/ablation_gates_growth$g \
    --set growth.max_epochs=$g --title "growth.max_epochs=$g, 3 seeds, 60 epochs per run" \
    > runs/growth$g.log 2>&1 &
done
timeout $LIMIT nice -n 5 python3 -m nestsynth.cli compare --data-dir $D --threads 1 --config $L5 --methods l0 \
  --sizes 2000,4000,6000,8000 --epochs 30 --seeds 3 --jobs 4 --device cuda --out runs/curves_lenet5_gpu_l0 \
  > runs/l5_l0.log 2>&1 &
timeout $LIMIT nice -n 5 python3 -m nestsynth.cli compare --data-dir $D --threads 1 --config $L5 --methods nest,gradual \
  --sizes 2000,4000,6000,8000 --epochs 30 --first-seed 1 --seeds 2 --jobs 5 --device cuda \
  --out runs/curves_lenet5_gpu_s12 > runs/l5_s12.log 2>&1 &
while sleep 60; do
  date; grep -h "done\|failed" runs/*.log | wc -l; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  jobs -r | grep -q . || break
done
wait
tail -n 3 runs/*.log
tar czf "$OUT/runs.tgz" --exclude=checkpoints --exclude=plots runs
