#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md in one run on a lent H100/H200 (the `device` tool's
# `run`, carry: ["gpu_payload"]); about 5 minutes. Prepare the payload here first:
#   bash benchmarks/gpu_check.sh --prepare
# Its image holds torch, Lightning, torchmetrics and TensorBoard but no Hydra: the wheels
# travel in gpu_payload/, with the JPEG data set as one tar (../shared does not travel).
set -euo pipefail
cd "$(dirname "$0")/.."
PAYLOAD=gpu_payload

if [[ "${1:-}" == "--prepare" ]]; then
    grep -qx "/$PAYLOAD/" .git/info/exclude || echo "/$PAYLOAD/" >> .git/info/exclude
    mkdir -p "$PAYLOAD/wheels"
    # Pure-Python wheels (antlr4's is built here from its source release): any Python 3 takes them.
    python3 -m pip wheel -q --no-deps -w "$PAYLOAD/wheels" \
        hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3
    tar -C ../shared -cf "$PAYLOAD/cifar10-jpg.tar" cifar10-jpg
    du -sh "$PAYLOAD"
    exit 0
fi

OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT" /tmp/data
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$PAYLOAD"/wheels/*
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
tar -C /tmp/data -xf "$PAYLOAD/cifar10-jpg.tar"
export CIFAR10_DIR=/tmp/data/cifar10-jpg CIFAR_CNN_CACHE_DIR=/tmp/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

# The seed config: project against the plain loop, float32 and bf16.
python3 benchmarks/train_speed.py --device cuda --epochs 3 --output "$OUT/seed_fp32.json" \
    2>&1 | tail -8
python3 benchmarks/train_speed.py --device cuda --epochs 3 --precision bf16-mixed \
    --output "$OUT/seed_bf16.json" 2>&1 | tail -8
# The fast recipe's training loop against the plain loop, then three seeds end to end.
python3 benchmarks/train_speed.py --device cuda --epochs 3 --precision bf16-mixed \
    --output "$OUT/fast_bench.json" experiment=fast 2>&1 | tail -8
for seed in 0 1 2; do
    python3 train.py experiment=fast trainer=gpu ++trainer.precision=bf16-mixed seed=$seed \
        hydra.run.dir="/tmp/runs/fast_seed$seed" > "/tmp/runs_fast_seed$seed.log" 2>&1
    cp "/tmp/runs/fast_seed$seed/metrics.json" "$OUT/fast_seed$seed.json"
    grep -h "epoch 0" "/tmp/runs_fast_seed$seed.log" | tail -2
done
python3 -c "import json, statistics as s; a=[json.load(open(f'$OUT/fast_seed{i}.json'))['test/acc'] for i in range(3)]; print('fast test/acc', a, s.mean(a), s.stdev(a))"
