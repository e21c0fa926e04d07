#!/usr/bin/env bash
# Quick GPU check in one script (time not yet measured on a GPU), run from the project root on your GPU machine:
#   bash benchmarks/gpu_check.sh            # prints every figure; exit 1 if a GPU path fails
# For the full checks with a results file, use `python benchmarks/gpu/run.py --out gpu-results`.
# It uses the Python that has torch (the project's .venv if present, else python3). On a machine without
# internet access, packages it lacks (DALI, webdataset, ...) are installed only from wheel files in
# $WHEELS (default: ./wheels; `pip download` them elsewhere, or use the GPU kit: `make gpu-kit`);
# whatever still cannot be imported is reported and its section skipped, so the figures that can be had
# are still printed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
WHEELS=${WHEELS:-wheels}
status=0
section() { echo; echo "== $* =="; }

section "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' || exit 1

for mod in nvidia.dali webdataset PIL; do
  if ! $PY -c "import $mod" 2>/dev/null; then
    if [[ -d $WHEELS ]]; then
      echo "installing for $mod from $WHEELS"; $PY -m pip install -q --no-index --find-links "$WHEELS" \
        "$(case $mod in nvidia.dali) echo nvidia-dali-cuda120;; PIL) echo pillow;; *) echo $mod;; esac)" || true
    fi
  fi
done
$PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true   # the project itself, offline

section "model on GPU: bf16 autocast + channels_last, training img/s (ours bn vs torchvision, paper)"
timeout 180 $PY benchmarks/model_throughput.py --device cuda --sizes 224 --batch 128 --rounds 3 --amp --channels-last || status=1

if $PY -c "import nvidia.dali" 2>/dev/null; then
  section "DALI GPU train pipelines (mixed decoder), every strategy"
  timeout 120 $PY - <<'PYEOF' || status=1
import tempfile, time, numpy as np, torch
from pathlib import Path
from benchmarks.synthetic import photo_jpeg
from pipeline.shards.format import ShardSample
from pipeline.shards.splits import write_split
from pipeline.data.dali_train import DALITrainLoader, TrainPipelineConfig
from pipeline.data.dali_eval import DALIEvalLoader
from pipeline.data.sampling import get_strategy, list_strategies
rng = np.random.default_rng(0)
d = Path(tempfile.mkdtemp())
split = write_split(d / "train", (ShardSample(f"k{i:05d}", i % 10, photo_jpeg(i, rng), {"width": 500, "height": 375})
                                  for i in range(512)), [str(i) for i in range(10)], per_shard=128)
for name in list_strategies():
    ld = DALITrainLoader(split, TrainPipelineConfig(get_strategy(name, 224), batch_size=64, device="gpu"))
    t = time.perf_counter(); n = 0
    for x, y in ld:
        n += len(y)
    torch.cuda.synchronize()
    print(f"{name:<26} {tuple(x.shape)} {x.dtype} on {x.device}: {n / (time.perf_counter() - t):,.0f} img/s")
for crops in (1, 10, 144):
    ev = DALIEvalLoader(split, n_crops=crops, input_size=224, batch_size=8, device="gpu", limit=64)
    t = time.perf_counter(); n = sum(len(y) for _, y in ev)
    print(f"eval {crops:>3} crops: {n * crops / (time.perf_counter() - t):,.0f} crops/s")
PYEOF
  section "data loading: DALI GPU vs fallback"
  timeout 180 $PY benchmarks/data_loading.py --device gpu --images 1000 --threads 8 || status=1
else
  section "DALI: not importable here (no wheel in $WHEELS); GPU pipeline checks skipped"
  status=1
fi
exit $status
