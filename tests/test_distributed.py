"""Data parallelism for real: gloo process groups, torchrun with 2 processes, and a simulated 2-node job.

The pruner's contract under DDP: the same gate stream on every rank, theta gradients averaged over
ranks, identical pruning decisions (checked; a disagreement stops every rank), and identical final
networks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from cap.core.gates import gates_of
from cap.core.sync import digest_tensors
from cap.data.bundle import shard_indices
from cap.engine.distributed import RankMismatchError
from tests.prune_utils import gloo_rank_pruner

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (7, 3), (2, 3)])
def test_evaluation_shards_cover_every_sample_exactly_once(n, world):
    order = torch.randperm(n)
    parts = [shard_indices(order, r, world, even=False) for r in range(world)]
    assert sorted(torch.cat(parts).tolist()) == list(range(n))


@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (7, 3), (2, 3)])
def test_training_shards_are_equal_and_cover_everything(n, world):
    order = torch.randperm(n)
    parts = [shard_indices(order, r, world, even=True) for r in range(world)]
    assert len({len(p) for p in parts}) == 1, "every rank must take the same number of samples"
    assert set(torch.cat(parts).tolist()) == set(range(n))
    assert sum(len(p) for p in parts) - n < world  # at most world-1 repeats


def test_folder_sampler_shards_and_resumes_like_the_tensor_loader():
    from cap.data.imagenet import ShardSampler

    train = [ShardSampler(11, shuffle=True, seed=3, rank=r, world_size=2, even=True) for r in range(2)]
    for sampler in train:
        sampler.epoch = 4
    parts = [list(s) for s in train]
    assert len(parts[0]) == len(parts[1]) == 6 and set(parts[0] + parts[1]) == set(range(11))
    train[0].skip = 4  # resuming after 4 samples of this rank's epoch yields exactly the rest
    assert list(train[0]) == parts[0][4:]
    train[0].epoch = 5
    train[0].skip = 0
    assert list(train[0]) != parts[0], "a new epoch draws a new order"
    test = [list(ShardSampler(11, shuffle=False, seed=0, rank=r, world_size=2, even=False)) for r in range(2)]
    assert sorted(test[0] + test[1]) == list(range(11))


# ---------------------------------------------------------------------------- pruner under gloo
def _pruner_worker(rank: int, world: int, init_file: str, perturb: bool, out: str) -> None:
    with gloo_rank_pruner(rank, world, init_file, steps=10) as (model, pruner, batches):
        if perturb and rank == 1:
            gates_of(model)[0].theta[0] -= 1e-3
        result, draws = "ok", []
        try:
            for x, y in batches:
                pruner.before_forward()
                F.cross_entropy(model(x), y).backward()
                draws.append(gates_of(model)[0].xi.detach().clone())
                pruner.after_step()
        except RankMismatchError as exc:
            result = str(exc)
        thetas = [g.theta.clone() for g in gates_of(model)]
        torch.save({"result": result, "thetas": thetas, "draws": draws}, f"{out}/rank{rank}.pt")


def _run_pruner_ranks(tmp_path: Path, perturb: bool) -> list[dict]:
    mp.spawn(_pruner_worker, args=(2, str(tmp_path / "init"), perturb, str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_ranks_with_different_data_keep_identical_thetas(tmp_path):
    r0, r1 = _run_pruner_ranks(tmp_path, perturb=False)
    assert r0["result"] == r1["result"] == "ok"
    assert all(torch.equal(a, b) for a, b in zip(r0["thetas"], r1["thetas"], strict=True))
    moved = torch.cat(r0["thetas"])
    assert float(moved.min()) < 1.0, "the theta steps must have moved some thetas"
    # one shared gate stream: each rank drew its own slice of the global batch, not the same draws
    assert any(not torch.equal(a, b) for a, b in zip(r0["draws"], r1["draws"], strict=True))


def test_a_rank_that_diverges_stops_every_rank(tmp_path):
    r0, r1 = _run_pruner_ranks(tmp_path, perturb=True)
    for r in (r0, r1):
        assert "ranks disagree on the pruning check at step 4" in r["result"]


# ---------------------------------------------------------------------------- torchrun end to end
def _torchrun(out: Path, node_args: list[str], *overrides: str) -> subprocess.Popen:
    cmd = [str(TORCHRUN), *node_args, "-m", "cap", "train", "--config", "configs/smoke.yaml", "--out", str(out),
           "train.epochs=4", "prune.harden_at=0.75", "train.progress=false", "tracking.enabled=false", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _check_ddp_run(out: Path, log: str) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2, log
    digests = summary["final_weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1], "the ranks ended with different networks"
    saved = torch.load(out / "model.pt", weights_only=True)
    assert digest_tensors(list(saved["state_dict"].values())) == digests[0], "model.pt is not the ranks' network"
    history = json.loads((out / "history.json").read_text())
    assert all(h["test_seen"] == 1000 for h in history), "evaluation must count each test image exactly once"
    assert summary["prune_events"], "the DDP run must prune"
    assert summary["units_kept"] < summary["units_total"]
    return summary


@pytest.mark.slow
def test_torchrun_two_processes_prunes_units_and_blocks(tmp_path):
    from mlflow.tracking import MlflowClient

    out, uri = tmp_path / "ddp", f"sqlite:///{tmp_path}/mlflow.db"
    proc = _torchrun(out, ["--nproc_per_node=2", f"--master_port={free_port()}"], "tracking.enabled=true",
                     f"tracking.uri={uri}", "tracking.experiment=ddp")
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    summary = _check_ddp_run(out, log)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1, "only rank 0 may log"
    assert runs[0].data.params["world_size"] == "2" and runs[0].info.run_id == summary["mlflow_run_id"]
    assert {e["kind"] for e in summary["prune_events"]} == {"units", "block"}, log
    assert summary["hardened_at_step"] is not None, "hardening under DDP (an agreement check) must have run"
    assert "2 processes (gloo)" in log


@pytest.mark.slow
def test_simulated_two_node_job(tmp_path):
    """Two torchrun invocations, one per 'node', meeting on 127.0.0.1; batch-shared gates, so a whole
    block can be switched off for a step on both ranks without hanging DDP."""
    out, port = tmp_path / "nodes", free_port()
    nodes = [_torchrun(out, ["--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                             f"--master_port={port}"], "prune.sampling=batch") for rank in (0, 1)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs
    _check_ddp_run(out, logs[0])
    assert "run " in logs[0] and "run " not in logs[1], "only global rank 0 reports"
