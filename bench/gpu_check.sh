#!/usr/bin/env bash
# The GPU numbers issue 11 asks for, in one command (about 5 min on an H100/H200):
# Beauty epoch and full-ranking evaluation times of SASRec and FAERec-SASRec on one GPU,
# then aggregate FAERec-SASRec epochs per second with 1, 2, 4 and 8 trials sharing it.
#
#   BEAUTY=path/to/Beauty.txt PYTHON=.venv/bin/python bench/gpu_check.sh [out_dir]
#
# BEAUTY: the authors' Beauty.txt (default: the shared data folder next to the checkout, or
# shared/ inside it). Settings as bench/bench_epoch.py: d 128, batch 256, length 50, random
# 1536-d stand-in embeddings; STEPS timed steps per trial (Beauty has 88 per epoch) after a
# warm-up step; trials of one packing level start timing together (a barrier) and the
# aggregate is the sum over trials of 1 / (their epoch time).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-60}
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
BEAUTY=${BEAUTY:-}
for candidate in "$BEAUTY" ../shared/data/faerec_official/Beauty.txt shared/data/faerec_official/Beauty.txt; do
  if [ -n "$candidate" ] && [ -f "$candidate" ]; then BEAUTY=$(realpath "$candidate"); break; fi
done
[ -f "$BEAUTY" ] || { echo "gpu_check: Beauty.txt not found; set BEAUTY=path/to/Beauty.txt" >&2; exit 2; }
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no GPU')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

export FAEREC_CACHE=${FAEREC_CACHE:-$OUT/cache}
DATASET=$OUT/beauty.yaml
printf 'format: faerec\nname: beauty\ninteractions: %s\nmin_sequence_length: 3\n' "$BEAUTY" > "$DATASET"
BENCH=(bench/bench_epoch.py --dataset "$DATASET" --device cuda --threads 1 --max-batches "$STEPS")

echo "== a SASRec step on the GPU path waits for no host sync"
PYTHONPATH=$PWD "$PYTHON" -m pytest -q tests/test_train.py -k gpu_base_step -p no:cacheprovider || true
echo "== one trial: SASRec and FAERec-SASRec (epoch, all test users evaluated)"
PYTHONPATH=$PWD "$PYTHON" "${BENCH[@]}" --json | tee "$OUT/single.json"
echo "== one trial, bf16 autocast"
PYTHONPATH=$PWD "$PYTHON" "${BENCH[@]}" --autocast --json | tee "$OUT/single_autocast.json"

for n in 1 2 4 8; do
  dir=$OUT/packed_$n
  mkdir -p "$dir"
  for i in $(seq "$n"); do
    PYTHONPATH=$PWD "$PYTHON" "${BENCH[@]}" --one faerec --eval-users 1 --ready-dir "$dir" > "$dir/trial_$i.json" &
  done
  until [ "$(find "$dir" -name '*.ready' | wc -l)" -ge "$n" ]; do sleep 0.2; done
  touch "$dir/go"
  wait
  "$PYTHON" - "$dir" "$n" <<'EOF'
import json, sys
from pathlib import Path
rows = [json.loads(p.read_text().strip().splitlines()[-1]) for p in sorted(Path(sys.argv[1]).glob("trial_*.json"))]
epochs_per_s = sum(1 / r["epoch_s"] for r in rows)
print(f"{sys.argv[2]} trial(s) per GPU: FAERec-SASRec epoch {min(r['epoch_s'] for r in rows):.1f}-"
      f"{max(r['epoch_s'] for r in rows):.1f} s each, aggregate {epochs_per_s:.3f} epochs/s, "
      f"peak GPU memory per trial {max(r['peak_gpu_mib'] for r in rows):.0f} MiB")
EOF
done | tee "$OUT/packing.txt"
echo "results in $OUT"
