#!/usr/bin/env bash
# The GPU measurements of benchmarks/README.md in one run.
#
# Needs a machine with a CUDA GPU where torch, Lightning, torchmetrics and TensorBoard are
# installed; no network and no copy of the data there. Hydra, OmegaConf, submitit and airbench
# need not be installed: their wheels come in the payload, with the JPEG data set packed as one
# gzipped tar (60,000 small files copy and unpack faster as one file). Optuna is not needed:
# Hydra says that the project's search plugin could not be imported, and goes on.
#
# 1. Where the data is (../shared/cifar10-jpg) and pip can download, make the payload, the
#    git-ignored folder gpu_payload/:
#      bash benchmarks/gpu_check.sh --prepare
# 2. On the GPU machine, in a copy of the repository that holds gpu_payload/:
#      OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh [part ...]
#    The parts, in order of importance (all of them without arguments):
#      fast        the fast recipe, 3 seeds; eval.py on seed 0; airbench's train94, 3 seeds
#      overhead    step_overhead.py and train_speed.py, with profiles; the recipe compiled
#      shared_gpu  sweep_throughput.py: 16 tutorial jobs, 1 at a time against 8 at once
#      resnet18    experiment=resnet18, 3 seeds side by side (the longest part)
#    The results go to the folder OUT (default /tmp/gpu_out): log.txt (the whole log, written
#    as the run goes), each sweep's summary.csv and each benchmark's JSON. Everything else
#    (data, sweeps, evaluation, profiles) stays under /tmp; the log has what matters of it.
set -euo pipefail
cd "$(dirname "$0")/.."
PAYLOAD=gpu_payload

if [[ "${1:-}" == "--prepare" ]]; then
    grep -qx "/$PAYLOAD/" .git/info/exclude || echo "/$PAYLOAD/" >> .git/info/exclude
    mkdir -p "$PAYLOAD/wheels"
    # Pure-Python wheels (antlr4's is built here from its source release): any Python 3 takes them.
    python3 -m pip wheel -q --no-deps -w "$PAYLOAD/wheels" \
        hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 airbench==0.1.8 \
        hydra-submitit-launcher==1.2.0 submitit==1.5.4 cloudpickle==3.1.3
    tar -C ../shared -czf "$PAYLOAD/cifar10-jpg.tar.gz" cifar10-jpg
    du -sh "$PAYLOAD"
    exit 0
fi

ALL_PARTS=(fast overhead shared_gpu resnet18)
PARTS=("${ALL_PARTS[@]}")
(($#)) && PARTS=("$@")
for part in "${PARTS[@]}"; do  # every named part is one, before anything runs
    known=false
    for name in "${ALL_PARTS[@]}"; do [[ "$part" == "$name" ]] && known=true; done
    $known || { echo "no part '$part': ${ALL_PARTS[*]}" >&2; exit 2; }
done
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT" /tmp/data
exec > >(tee "$OUT/log.txt") 2>&1  # the whole log, also of a run stopped before its end
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

run_and_eval_metrics() {  # a run folder, then eval.py's: both test metrics, all digits
    python3 - "$1/metrics.json" "$2/metrics.json" <<'PY'
import json, sys
run, evaluation = (json.load(open(path)) for path in sys.argv[1:])
print("test acc, loss: the run's", run["test/acc"], run["test/loss"],
      "/ eval.py's", evaluation["accuracy"], evaluation["loss"])
PY
}

part_fast() {
    fast_seeds fast
    # eval.py on the GPU in the precision the run trained in (bf16-mixed): seed 0's own metrics.
    python3 eval.py ckpt_path=/tmp/sweeps/fast/0 hydra.run.dir=/tmp/eval0 > /tmp/eval0.log 2>&1 &&
        run_and_eval_metrics /tmp/sweeps/fast/0 /tmp/eval0 || tail -20 /tmp/eval0.log
    # airbench's own code on the same data, three seeds: the yardstick for the line above.
    python3 benchmarks/airbench_reference.py --runs 3 --output "$OUT/airbench.json" 2>&1 | tail -5 ||
        echo "airbench_reference.py failed; the measurements below go on"
}

PROFILE_TABLES='under torch.profiler|^path '  # each path's table, then the summary
profile_counts() {  # a profile's JSON: each path's operations, launches, waits, copies per step
    python3 -c "import json, sys; details = json.load(open(sys.argv[1]))['details']
for path in ('reference', 'project'): print(path, details[path]['profile'])" "$1"
}

part_overhead() {
    # The tutorial config against the plain loop, both data paths side by side, with
    # Lightning's own per-step cost and the module's; then the fast recipe's loop.
    python3 benchmarks/step_overhead.py --device cuda --epochs 3 --rounds 2 \
        --output "$OUT/overhead.json" 2>&1 | tail -9
    python3 benchmarks/train_speed.py --device cuda --epochs 3 --precision bf16-mixed \
        --output "$OUT/fast_bench.json" experiment=fast 2>&1 | tail -6
    # Where each path's host time goes on the GPU: operations, kernel launches and syncs a step.
    python3 benchmarks/train_speed.py --device cuda --epochs 2 --steps 100 --profile \
        --output /tmp/tutorial_profile.json data=cifar10_on_device 2>&1 | grep -v "^{" |
        grep -E -A 21 "$PROFILE_TABLES"
    profile_counts /tmp/tutorial_profile.json
    python3 benchmarks/train_speed.py --device cuda --epochs 2 --profile --precision bf16-mixed \
        --output /tmp/fast_profile.json experiment=fast 2>&1 | grep -v "^{" |
        grep -E -A 21 "$PROFILE_TABLES"
    profile_counts /tmp/fast_profile.json
    fast_seeds fast_compiled model.compile=true  # its first epoch waits for the compiler
    python3 benchmarks/train_speed.py --device cuda --epochs 3 --precision bf16-mixed --compile \
        --output "$OUT/fast_bench_compiled.json" experiment=fast 2>&1 | tail -6
}

part_shared_gpu() {
    # Jobs an hour of a 16-job grid of the tutorial net, 3 epochs a job (a job's start-up is a
    # larger share than in the 10-epoch recipe: each sweep's line also gives its jobs' mean
    # fit_time_s).
    python3 benchmarks/sweep_throughput.py --jobs 16 --concurrent 1,8 --epochs 3 \
        -- trainer=gpu 2>&1 | tail -3 | tee "$OUT/shared_gpu.txt" ||
        echo "sweep_throughput.py failed; the measurements below go on"
}

part_resnet18() {
    # Three seeds at once on the one GPU (hydra/launcher=shared_gpu): each job's time is its
    # time beside the other two.
    python3 train.py -m experiment=resnet18 trainer=gpu trainer.precision=bf16-mixed seed=0,1,2 \
        hydra/launcher=shared_gpu hydra.sweep.dir=/tmp/sweeps/resnet18 > /tmp/resnet18.log 2>&1 ||
        tail -20 /tmp/resnet18.log
    cat /tmp/sweeps/resnet18/summary.md && cp /tmp/sweeps/resnet18/summary.csv "$OUT/resnet18.csv" || true
}

for part in "${PARTS[@]}"; do
    echo "== $part"
    "part_$part"
done
