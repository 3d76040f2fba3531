"""SLURM cluster profiles (slurm/*.yaml): load, check, and turn into submitit parameters.

A profile is checked three times before anything is queued: its keys and value formats here, then
against the live cluster (`sinfo`/`scontrol`: the partition exists, it has the nodes, a node has the
CPUs, memory and GPUs asked for), then by `sbatch --test-only`, which lets SLURM itself judge what
we cannot (accounts, QOS, constraints, extra options). A bad profile therefore fails at submit time
with a message naming the key, and never leaves a job pending forever.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ProfileError(ValueError):
    """A cluster profile is malformed or asks for something the cluster cannot give; names the key."""


REQUIRED = ("partition", "nodes", "gpus_per_node", "cpus_per_task", "mem", "time")
OPTIONAL = ("tasks_per_node", "account", "qos", "constraint", "requeue", "signal_delay_s", "max_requeues",
            "setup", "extra_sbatch")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEM = re.compile(r"^(\d+)([KMGT]?)B?$", re.IGNORECASE)
_MEM_MB = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2}


@dataclass
class Profile:
    """One cluster profile. `tasks_per_node` is one per GPU (or the CPU workers asked for)."""

    name: str
    partition: str
    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    mem: str
    time_min: int
    tasks_per_node: int
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    requeue: bool = True
    signal_delay_s: int = 120
    max_requeues: int = 3
    setup: list[str] = field(default_factory=list)
    extra_sbatch: dict[str, Any] = field(default_factory=dict)

    @property
    def mem_mb(self) -> int:
        number, unit = _MEM.match(self.mem).groups()
        return int(int(number) * _MEM_MB[unit.upper()])

    def sbatch_options(self, tasks_per_node: int | None = None, cpus_per_task: int | None = None) -> dict[str, Any]:
        """sbatch's own option names and values (what `sbatch --test-only` and the job script get)."""
        options: dict[str, Any] = {
            "partition": self.partition, "nodes": self.nodes,
            "ntasks-per-node": tasks_per_node or self.tasks_per_node,
            "cpus-per-task": cpus_per_task or self.cpus_per_task, "mem": self.mem, "time": self.time_min}
        if self.gpus_per_node:
            options["gpus-per-node"] = self.gpus_per_node
        for key in ("account", "qos", "constraint"):
            if getattr(self, key):
                options[key] = getattr(self, key)
        if self.requeue:
            options["requeue"] = True
        options.update(self.extra_sbatch)
        return options


def _int(data: dict, key: str, minimum: int) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ProfileError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def parse_time(value: Any) -> int:
    """SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) or plain minutes, in whole minutes (rounded up)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ProfileError(f"time: expected a positive number of minutes, got {value}")
        return value
    m = _TIME.match(str(value).strip())
    if not m:
        raise ProfileError(f"time: {value!r} is not a SLURM time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
                           "D-HH:MM:SS)")
    days, a, b, c = m.groups()
    if days is not None:  # D-H[:M[:S]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # H:M:S
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    else:  # M or M:S
        seconds = int(a) * 60 + int(b or 0)
    if seconds <= 0:
        raise ProfileError(f"time: {value!r} is zero")
    return -(-seconds // 60)


def parse_profile(data: Any, name: str = "profile") -> Profile:
    """A Profile from a profile's YAML mapping; ProfileError names the first bad key."""
    if not isinstance(data, dict):
        raise ProfileError(f"{name}: expected a mapping of {', '.join(REQUIRED)}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ProfileError(f"{name}: unknown key {unknown[0]!r} (allowed: {', '.join(REQUIRED + OPTIONAL)})")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ProfileError(f"{name}: missing key {missing[0]!r} (every profile sets {', '.join(REQUIRED)})")
    if not isinstance(data["partition"], str) or not data["partition"]:
        raise ProfileError(f"partition: expected a partition name, got {data['partition']!r}")
    gpus = _int(data, "gpus_per_node", 0)
    tasks = _int(data, "tasks_per_node", 1) if "tasks_per_node" in data else max(gpus, 1)
    if gpus and tasks != gpus:  # the trainer maps LOCAL_RANK to a GPU: one process per GPU
        raise ProfileError(f"tasks_per_node: {tasks} tasks on {gpus} GPUs per node; cap runs one task per GPU")
    mem = str(data["mem"]).strip()
    if not _MEM.match(mem):
        raise ProfileError(f"mem: {data['mem']!r} is not a SLURM memory size (e.g. 4000M, 16G)")
    extra = data.get("extra_sbatch") or {}
    if not isinstance(extra, dict):
        raise ProfileError(f"extra_sbatch: expected a mapping of sbatch options, got {extra!r}")
    setup = data.get("setup") or []
    if not isinstance(setup, list) or not all(isinstance(s, str) for s in setup):
        raise ProfileError(f"setup: expected a list of shell lines, got {setup!r}")
    if not isinstance(data.get("requeue", True), bool):
        raise ProfileError(f"requeue: expected true or false, got {data['requeue']!r}")
    return Profile(
        name=name, partition=data["partition"], nodes=_int(data, "nodes", 1), gpus_per_node=gpus,
        cpus_per_task=_int(data, "cpus_per_task", 1), mem=mem, time_min=parse_time(data["time"]),
        tasks_per_node=tasks, account=data.get("account"), qos=data.get("qos"), constraint=data.get("constraint"),
        requeue=data.get("requeue", True),
        signal_delay_s=_int(data, "signal_delay_s", 1) if "signal_delay_s" in data else 120,
        max_requeues=_int(data, "max_requeues", 0) if "max_requeues" in data else 3,
        setup=setup, extra_sbatch=extra)


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ProfileError(f"cannot read cluster profile {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path} is not valid YAML: {exc}") from exc
    return parse_profile(data, str(path))


# ---------------------------------------------------------------------------- the live cluster
def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _gpus(gres: str) -> int:
    """GPUs in a node's GRES string, e.g. 'gpu:a100:4(S:0-1),shard:8' -> 4."""
    return sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", gres))


def check_against_cluster(profile: Profile, tasks_per_node: int | None = None,
                          cpus_per_task: int | None = None) -> None:
    """Raise ProfileError when the live cluster cannot run the profile (sinfo, then sbatch --test-only)."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        raise ProfileError("no SLURM client here (sinfo/sbatch not found): submit from a login node of the cluster")
    tasks, cpus = tasks_per_node or profile.tasks_per_node, cpus_per_task or profile.cpus_per_task
    known = _run(["sinfo", "-h", "-o", "%R"])
    if known.returncode != 0:
        raise ProfileError(f"sinfo failed: {known.stderr.strip()} (is slurmctld reachable?)")
    partitions = sorted(set(known.stdout.split()))
    if profile.partition not in partitions:
        raise ProfileError(f"partition: {profile.partition!r} is not a partition of this cluster "
                           f"(there are: {', '.join(partitions)})")
    nodes = [line.split("|") for line in _run(["sinfo", "-h", "-N", "-p", profile.partition, "-o",
                                                 "%N|%c|%m|%G"]).stdout.split()]
    nodes = list({n[0]: n for n in nodes}.values())  # a node listed once per partition state
    if profile.nodes > len(nodes):
        raise ProfileError(f"nodes: {profile.nodes} asked for, partition {profile.partition!r} has {len(nodes)}")
    cpus_most = max(int(n[1].rstrip("+")) for n in nodes)
    if tasks * cpus > cpus_most:
        raise ProfileError(f"cpus_per_task: {tasks} task(s) x {cpus} CPUs per node asked for, the largest node "
                           f"of partition {profile.partition!r} has {cpus_most}")
    mem_most = max(int(n[2].rstrip("+")) for n in nodes)
    if profile.mem_mb > mem_most:
        raise ProfileError(f"mem: {profile.mem} asked for, the largest node of partition {profile.partition!r} "
                           f"has {mem_most}M")
    gpus_most = max(_gpus(n[3]) for n in nodes)
    if profile.gpus_per_node > gpus_most:
        raise ProfileError(f"gpus_per_node: {profile.gpus_per_node} asked for, the nodes of partition "
                           f"{profile.partition!r} have at most {gpus_most}")
    options = profile.sbatch_options(tasks, cpus)
    flags = [f"--{k}" if v is True else f"--{k}={v}" for k, v in options.items()]
    test = _run(["sbatch", "--test-only", *flags, "--wrap=true"])
    if test.returncode != 0:  # SLURM's own verdict (account, qos, constraint, extra options, limits)
        raise ProfileError(f"SLURM refuses profile {profile.name}: {test.stderr.strip()}")
