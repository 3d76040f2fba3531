#!/usr/bin/env bash
# Core comparison on a lent GPU (one script, runs side by side on one GPU): full Fashion-MNIST, ResNet-20,
# configs/fmnist_resnet20.yaml (8 epochs, the peer's recipe): dense; cap with step_norm=cost and cost_noise
# at several tau; Torch-Pruning 1.6.1 at a 50 % MAC target with the same epochs. Writes $OUT/core_results.json.
# No network on the GPU machine: carry the Fashion-MNIST .gz folder and the torch-pruning wheel.
# Usage: OUT=bench_out/gpu_core [COST_TAUS=..] [NOISE_TAUS=..] [TP_TARGETS=..] [TP_SEEDS=..] [DENSE_SEEDS=..]
#        [VARIANTS="name=key=value,key=value ..."] [EXTRA="key=value ..."] bash tools/gpu_core.sh DATA_DIR [TP_WHEEL]
set -uo pipefail
DATA=${1:?folder with the Fashion-MNIST .gz files}
WHEEL=${2:-}
OUT=${OUT:-bench_out/gpu_core}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
[ -n "$WHEEL" ] && $PY -m pip install -q --no-deps "$WHEEL" > "$OUT/pip.log" 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/gpu.txt" 2>&1
common=(--config configs/fmnist_resnet20.yaml "data.root=$DATA" train.device=cuda tracking.enabled=false
        train.progress=false train.checkpoint=false train.threads=2 ${EXTRA:-})
# RUN_LIMIT (seconds) stops a run that would outlast the device call, so that the others are still collected
run() { local name=$1; shift; timeout "${RUN_LIMIT:-100000}" "$@" > "$OUT/$name.log" 2>&1 || echo "FAILED $name" >> "$OUT/gpu.txt"; }
for seed in ${DENSE_SEEDS:-0}; do
  run "dense-s$seed" $PY -m cap train "${common[@]}" prune.tau=0 seed="$seed" --out "$OUT/dense-s$seed" &
done
# VARIANTS="name=key=value,key=value name2=..." : any further cap runs, each with its own overrides (values
# are split at commas, so a list value such as train.milestones=[0.5,0.75] cannot be given here)
for variant in ${VARIANTS:-}; do
  name=${variant%%=*}
  IFS=, read -r -a ovs <<< "${variant#*=}"
  run "$name" $PY -m cap train "${common[@]}" "${ovs[@]}" --out "$OUT/$name" &
done
for tau in ${COST_TAUS-0.2 0.6}; do
  run "cost-t$tau" $PY -m cap train "${common[@]}" prune.tau="$tau" prune.step_norm=cost --out "$OUT/cost-t$tau" &
done
for tau in ${NOISE_TAUS-0.6 1.5 4}; do
  run "noise-t$tau" $PY -m cap train "${common[@]}" prune.tau="$tau" prune.step_norm=cost_noise \
      --out "$OUT/noise-t$tau" &
done
if $PY -c "import torch_pruning" 2>/dev/null; then
  for target in ${TP_TARGETS:-0.5}; do
    for seed in ${TP_SEEDS:-0}; do
      run "tp-$target-s$seed" $PY tools/peers/torch_pruning_baseline.py "${common[@]}" seed="$seed" \
          --target-mac-ratio "$target" --out "$OUT/tp-$target-s$seed" &
    done
  done
fi
wait
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
res = {"gpu": (out / "gpu.txt").read_text().strip().splitlines()}
for d in sorted(p for p in out.iterdir() if (p / "summary.json").exists()):
    s = json.loads((d / "summary.json").read_text())
    h = json.loads((d / "history.json").read_text()) if (d / "history.json").exists() else []
    res[d.name] = {k: s.get(k) for k in ("test_acc", "mac_ratio", "param_ratio", "layers_kept", "units_kept",
                                         "units_total", "theta_undecided", "theta_undecided_at_harden",
                                         "theta_locked_at_harden", "train_seconds", "hardened_at_step")}
    res[d.name]["acc_by_epoch"] = [round(r["test_acc"], 4) for r in h]
    res[d.name]["mac_by_epoch"] = [round(r.get("mac_ratio", 0), 3) for r in h]
    res[d.name]["loss_by_epoch"] = [round(r["train_loss"], 4) for r in h]
(out / "core_results.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))
PY
