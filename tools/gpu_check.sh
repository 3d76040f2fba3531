#!/usr/bin/env bash
# The GPU check of the trainer, as one script for a lent GPU machine (no network there: carry the
# Fashion-MNIST .gz files and pass their folder). Writes logs, run folders and gpu_results.json to $OUT.
#   1. one epoch of ResNet-56 on full Fashion-MNIST (469 steps of 128), dense and cap (tau 0.6, gates sampled
#      from step 0, no removals), fp32 against bf16/fp16 autocast, with and without channels_last: AMP ratios;
#   2. CUDA pruning run (configs/smoke.yaml) stopped by SIGTERM after its first epoch and resumed, against
#      the same run uninterrupted, with train.deterministic=true: is the resumed run bit-identical on CUDA?
# PARTS="amp resume" (default) picks the parts.
# Usage: OUT=bench_out/gpu bash tools/gpu_check.sh DATA_DIR
set -uo pipefail
DATA=${1:?folder with the Fashion-MNIST .gz files}
OUT=${OUT:-bench_out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
read -r -a EXTRA <<< "${EXTRA:-}"  # extra overrides, e.g. for a CPU dry run
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } > "$OUT/gpu.txt" 2>&1
common=(--config configs/fmnist_resnet20.yaml model.name=resnet56 "data.root=$DATA" train.device=$DEVICE
        tracking.enabled=false train.progress=false train.epochs=1 train.checkpoint=false prune.warmup_epochs=0
        prune.check_every=1000000 "${EXTRA[@]}")
PARTS=${PARTS:-amp resume}
if [[ $PARTS == *amp* ]]; then
# cap runs keep the whole network (no pruning checks) so that every configuration times the same network
for spec in "0 off false" "0 bf16 false" "0 bf16 true" "0 fp16 true" "0.6 off false" "0.6 bf16 true"; do
  read -r tau amp cl <<< "$spec"
  name="r56-tau$tau-$amp-cl$cl"
  $PY -m cap train "${common[@]}" prune.tau="$tau" train.amp="$amp" train.channels_last="$cl" \
      --out "$OUT/$name" > "$OUT/$name.log" 2>&1 || echo "FAILED $name" >> "$OUT/gpu.txt"
done
fi
if [[ $PARTS == *resume* ]]; then
smoke=(--config configs/smoke.yaml "data.root=$DATA" train.device=$DEVICE tracking.enabled=false
       train.progress=false train.epochs=3 train.deterministic=true "${EXTRA[@]}")
$PY -m cap train "${smoke[@]}" --out "$OUT/smoke-a" > "$OUT/smoke-a.log" 2>&1
$PY -m cap train "${smoke[@]}" --out "$OUT/smoke-b" > "$OUT/smoke-b.log" 2>&1 &
pid=$!
until grep -q "^epoch 1/3" "$OUT/smoke-b.log" 2>/dev/null || ! kill -0 $pid 2>/dev/null; do sleep 0.2; done
kill -TERM $pid; wait $pid; echo "stop exit $?" >> "$OUT/smoke-b.log"
$PY -m cap train --resume "$OUT/smoke-b" >> "$OUT/smoke-b.log" 2>&1
fi
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
import torch
out = Path(sys.argv[1])
res = {"gpu": (out / "gpu.txt").read_text().strip().splitlines()}
for d in sorted(out.glob("r56-*")):
    if (d / "summary.json").exists():
        s = json.loads((d / "summary.json").read_text())
        res[d.name] = {k: s[k] for k in ("epoch_seconds", "steps_per_epoch", "test_acc", "mac_ratio",
                                         "peak_memory_mb", "amp")}
if not (out / "smoke-b" / "model.pt").exists():
    (out / "gpu_results.json").write_text(json.dumps(res, indent=1))
    sys.exit(0)
a, b = (torch.load(out / n / "model.pt", weights_only=True) for n in ("smoke-a", "smoke-b"))
sa, sb = a["state_dict"], b["state_dict"]
same_arch = a["arch"] == b["arch"]
res["resume_on_cuda"] = {
    "same_arch": same_arch,
    "tensors_identical": sum(torch.equal(sa[k], sb[k]) for k in sa) if same_arch else None,
    "tensors": len(sa),
    "max_abs_diff": max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa) if same_arch else None,
    "summary_a": {k: json.loads((out / "smoke-a/summary.json").read_text())[k] for k in ("test_acc", "mac_ratio")},
    "summary_b": {k: json.loads((out / "smoke-b/summary.json").read_text())[k] for k in ("test_acc", "mac_ratio")},
}
(out / "gpu_results.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))
PY
