#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md in one run on a lent H100/H200 (the `device` tool's
# `run`, carry: ["gpu_payload"]); 510 s on an H100 (run 5 of benchmarks/README.md), run
# with timeout_s 580. At most 8 files come back
# from $OUT: the rest stays in /tmp, and the log has it. Prepare the payload here first:
#   bash benchmarks/gpu_check.sh --prepare
# Its image holds torch, Lightning, torchmetrics and TensorBoard but no Hydra nor Optuna (Hydra
# then prints that our search plugin could not be imported, and goes on): the Hydra wheels
# travel in gpu_payload/, with the JPEG data set as one gzipped tar (../shared does not travel;
# gzip takes the 89 MB tar of 60,000 small files to 20 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PAYLOAD=gpu_payload

if [[ "${1:-}" == "--prepare" ]]; then
    grep -qx "/$PAYLOAD/" .git/info/exclude || echo "/$PAYLOAD/" >> .git/info/exclude
    mkdir -p "$PAYLOAD/wheels"
    # Pure-Python wheels (antlr4's is built here from its source release): any Python 3 takes them.
    python3 -m pip wheel -q --no-deps -w "$PAYLOAD/wheels" \
        hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 airbench==0.1.8
    tar -C ../shared -czf "$PAYLOAD/cifar10-jpg.tar.gz" cifar10-jpg
    du -sh "$PAYLOAD"
    exit 0
fi

OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT" /tmp/data
exec > >(tee "$OUT/log.txt") 2>&1  # the whole log comes back, also when the run is cut short
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$PAYLOAD"/wheels/*
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
tar -C /tmp/data -xzf "$PAYLOAD/cifar10-jpg.tar.gz"
export CIFAR10_DIR=/tmp/data/cifar10-jpg CIFAR_CNN_CACHE_DIR=/tmp/cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"

FAST="experiment=fast trainer=gpu trainer.precision=bf16-mixed"
fast_seeds() {  # a name, then overrides: three seeds in one process (one start-up)
    local name="$1"; shift
    python3 train.py -m $FAST "$@" seed=0,1,2 hydra.sweep.dir="/tmp/sweeps/$name" \
        > "/tmp/$name.log" 2>&1 || tail -20 "/tmp/$name.log"
    grep -h -E "epoch [0-9]{3} |Test accuracy" /tmp/sweeps/"$name"/*/train.log | cut -c26- || true
    # The sweep's summary: each job's test/acc, fit_time_s, wall_time_s; mean ± std over seeds.
    cat "/tmp/sweeps/$name/summary.md" && cp "/tmp/sweeps/$name/summary.csv" "$OUT/$name.csv" || true
}

run_and_eval_figures() {  # a run folder, then eval.py's: both test figures, all digits
    python3 - "$1/metrics.json" "$2/metrics.json" <<'PY'
import json, sys
run, evaluation = (json.load(open(path)) for path in sys.argv[1:])
print("test acc, loss: the run's", run["test/acc"], run["test/loss"],
      "/ eval.py's", evaluation["accuracy"], evaluation["loss"])
PY
}

# In order of what matters most, so that a run cut short by its time limit still brings the
# first figures back (the log is copied as it is written).
fast_seeds fast
# eval.py on the GPU in the precision the run trained in (bf16-mixed): seed 0's own figures.
python3 eval.py ckpt_path=/tmp/sweeps/fast/0 hydra.run.dir=/tmp/eval0 > /tmp/eval0.log 2>&1 &&
    run_and_eval_figures /tmp/sweeps/fast/0 /tmp/eval0 || tail -20 /tmp/eval0.log
# airbench's own code on the same data, three seeds: the yardstick for the line above.
# (A payload prepared before it was added lacks its wheel: --prepare again.)
python3 benchmarks/airbench_reference.py --runs 3 --output "$OUT/airbench.json" 2>&1 | tail -5 ||
    echo "airbench_reference.py failed; the measurements below go on"
# The seed config against the plain loop, both data paths side by side, with Lightning's own
# per-step cost and the module's; then the fast recipe's loop.
python3 benchmarks/step_overhead.py --device cuda --epochs 3 --rounds 2 \
    --output "$OUT/overhead.json" 2>&1 | tail -9
python3 benchmarks/train_speed.py --device cuda --epochs 3 --precision bf16-mixed \
    --output "$OUT/fast_bench.json" experiment=fast 2>&1 | tail -6
# Where each path's host time goes on the GPU: operations, kernel launches and syncs per step.
PROFILE_TABLES='under torch.profiler|^path '  # each path's table, then the summary
profile_counts() {  # a profile's JSON: each path's operations, launches, waits, copies per step
    python3 -c "import json, sys; details = json.load(open(sys.argv[1]))['details']
for path in ('reference', 'project'): print(path, details[path]['profile'])" "$1"
}
python3 benchmarks/train_speed.py --device cuda --epochs 2 --steps 100 --profile \
    --output /tmp/seed_profile.json data=cifar10_gpu 2>&1 | grep -v "^{" |
    grep -E -A 21 "$PROFILE_TABLES"
profile_counts /tmp/seed_profile.json
python3 benchmarks/train_speed.py --device cuda --epochs 2 --profile --precision bf16-mixed \
    --output /tmp/fast_profile.json experiment=fast 2>&1 | grep -v "^{" |
    grep -E -A 21 "$PROFILE_TABLES"
profile_counts /tmp/fast_profile.json
fast_seeds fast_compiled model.compile=true  # its first epoch waits for the compiler
python3 benchmarks/train_speed.py --device cuda --epochs 3 --precision bf16-mixed --compile \
    --output "$OUT/fast_bench_compiled.json" experiment=fast 2>&1 | tail -6
