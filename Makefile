# The two commands of the README, and a few more. Each target sets up what it needs first.
.PHONY: setup demo smoke test test-fast lint bench

setup:
	bash tools/bootstrap.sh

demo: setup
	.venv/bin/cap train --config configs/demo.yaml

smoke: setup
	.venv/bin/cap train --config configs/smoke.yaml

test: setup
	.venv/bin/python -m pytest -q
	.venv/bin/ruff check cap dali_pipelines tests tools

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"

lint: setup
	.venv/bin/ruff check cap dali_pipelines tests tools

bench: setup
	.venv/bin/python tools/bench_core.py --config configs/fmnist_resnet20.yaml --taus 0.3 0.6 1.2 \
	  --out bench_out/core --write-docs docs/benchmarks.md data.train_subset=20000 prune.eta=0.006
