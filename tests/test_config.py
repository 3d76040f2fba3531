"""Bad input fails before any work starts, naming the key and what is allowed."""

import subprocess
import sys

import pytest

from cap.engine.config import ConfigError, build_config, load_config


@pytest.mark.parametrize("override,needle", [
    ("prune.tua=0.5", "unknown config key 'prune.tua'"),
    ("prune.tau=-1", "prune.tau"),
    ("prune.alpha=1.5", "prune.alpha"),
    ("prune.beta=-0.1", "prune.beta"),
    ("train.schedule=linear", "one of 'cosine', 'step', 'constant'"),
    ("train.epochs=two", "train.epochs"),
    ("data.name=svhn", "data.name"),
    ("prune", "key=value"),
    ("train.lr_warmup_epochs=8", "train.lr_warmup_epochs"),
    ("prune.sample_fraction=0", "prune.sample_fraction"),
    ("prune.sample_fraction=1.5", "prune.sample_fraction"),
    # values that used to pass validation and fail later (issue 18)
    ("model.name=resnet21", "config key 'model.name': got 'resnet21', allowed one of resnet110, "),
    ("seed=-1", "config key 'seed': got -1"),
    ("seed=4294967296", "config key 'seed'"),
    ("train.threads=-3", "config key 'train.threads': got -3, allowed null or >= 1"),
    ("prune.tau=.inf", "config key 'prune.tau': got inf, expected a finite number"),
    ("tracking.timeout=.inf", "config key 'tracking.timeout': got inf, expected a finite number"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        build_config({}, [override])


def _float_keys(obj, prefix=""):
    """Every dotted config key whose type takes a float (lists of floats as well)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _float_keys(value, f"{prefix}{f.name}.")
        elif "float" in str(hints[f.name]):
            yield f"{prefix}{f.name}", typing.get_origin(hints[f.name]) is list


def test_nan_and_inf_are_refused_for_every_float_key():
    from cap.engine.config import Config

    keys = list(_float_keys(Config()))
    assert len(keys) > 20 and ("prune.tau", False) in keys and ("train.milestones", True) in keys
    for key, is_list in keys:
        for bad in (".nan", ".inf", "-.inf"):
            value = f"[{bad}]" if is_list else bad
            with pytest.raises(ConfigError, match=f"config key '{key}(\\[0\\])?': got \\[?-?(nan|inf)"):
                build_config({}, [f"{key}={value}"])


def test_an_architecture_with_a_float_width_names_the_block(tmp_path):
    import json

    from cap.core.arch import architecture
    from cap.engine.state import model_from_arch_file
    from cap.models import create_model

    kwargs = {"num_classes": 10, "in_channels": 1, "input_size": 28, "width": 16}
    arch = architecture(create_model("resnet20", **kwargs), "resnet20", kwargs)
    arch["blocks"][1]["widths"][0] = 7.5
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(arch))
    with pytest.raises(ConfigError, match=r"model.arch: .*arch.json: block entry 1 \(0.1\) needs 'widths': a list "
                                          r"of integers >= 1, got \[7.5\]"):
        model_from_arch_file(str(path), "resnet20", kwargs)


def test_a_share_of_the_batch_needs_per_example_gates():
    with pytest.raises(ConfigError, match="needs per-example gates"):
        build_config({}, ["prune.sampling=batch", "prune.sample_fraction=0.5"])


def test_yaml_and_overrides_compose():
    cfg = build_config({"prune": {"tau": 0.3}, "train": {"epochs": 2}}, ["prune.alpha=1", "seed=7"])
    assert (cfg.prune.tau, cfg.prune.alpha, cfg.train.epochs, cfg.seed) == (0.3, 1.0, 2, 7)


def test_unknown_yaml_section_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("prune:\n  tau: 0.5\n  gamma: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'prune.gamma'"):
        load_config(path)


def _cap(*args, cwd):
    return subprocess.run([sys.executable, "-m", "cap", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["prune.tau=-0.5"], "prune.tau"),
    (["prune.alpha=2"], "prune.alpha"),
    (["prune.beta=3"], "prune.beta"),
    (["model.depth=3"], "unknown config key 'model.depth'"),
    (["data.name=cifar10", "data.root=/nonexistent/cifar"], "/nonexistent/cifar"),
    (["data.name=imagenet", "data.root=/nonexistent/imagenet"], "/nonexistent/imagenet"),
    (["model.name=resnet21"], "config key 'model.name': got 'resnet21'"),
    (["seed=-1"], "config key 'seed'"),
    (["prune.tau=.inf"], "config key 'prune.tau'"),
])
def test_cli_rejects_bad_input_before_any_work(tmp_path, args, needle):
    out = tmp_path / "run"
    result = _cap("train", "--out", str(out), *args, cwd=tmp_path)
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()  # nothing was started, nothing written


def test_cli_config_given_a_folder_says_it_is_a_folder(tmp_path):
    result = _cap("train", "--config", str(tmp_path), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: config file '{tmp_path}' is a folder; give the path of a YAML file"
    assert not (tmp_path / "run").exists()


def test_cli_help_lists_the_train_flags(tmp_path):
    result = _cap("train", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "--config" in result.stdout and "key=value" in result.stdout


def test_scientific_notation_is_a_number_in_yaml_and_overrides(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; a learning rate written that way must still work
    path = tmp_path / "sci.yaml"
    path.write_text("train:\n  lr: 1e-3\n")
    assert load_config(path, ["prune.eta=2E-2"]).train.lr == 1e-3
    assert build_config({}, ["prune.eta=2E-2"]).prune.eta == 0.02
    with pytest.raises(ConfigError, match="train.lr"):
        build_config({}, ["train.lr=1e-3x"])


def test_cli_stops_a_diverged_run_with_a_clear_error(tmp_path):
    out = tmp_path / "run"
    result = _cap("train", "--config", "configs/smoke.yaml", "--out", str(out), "train.lr=1e6", "train.epochs=2",
                  "data.train_subset=300", "data.test_subset=100", "tracking.enabled=false", "train.progress=false",
                  cwd=".")
    assert result.returncode == 1, result.stderr
    assert "training loss not finite in epoch 1" in result.stderr and "train.lr=1e+06" in result.stderr
    assert not (out / "summary.json").exists()
    assert not (out / "checkpoints" / "last.pt").exists()  # a broken network is not saved over anything


def test_lr_warmup_ramps_linearly_then_follows_the_schedule():
    import math

    import torch

    from cap.engine.run import make_scheduler

    cfg = build_config({}, ["train.epochs=4", "train.lr=0.1", "train.lr_warmup_epochs=1"])
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.train.lr)
    sched = make_scheduler(opt, cfg, total_steps=40)  # 10 steps per epoch
    rates = []
    for _ in range(40):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cosine = [0.05 * (1 + math.cos(math.pi * s / 40)) for s in range(40)]
    assert rates[:10] == pytest.approx([cosine[s] * (s + 1) / 10 for s in range(10)])
    assert rates[10:] == pytest.approx(cosine[10:])


def test_lr_rewind_replays_the_schedule_after_hardening():
    import math

    import torch

    from cap.engine.loop import make_scheduler

    cfg = build_config({}, ["train.epochs=4", "train.lr=0.1", "train.lr_rewind=0.25"])
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.train.lr)
    hardened: list[int] = []  # the pruner's harden_step: unknown until the structure is fixed at step 20
    sched = make_scheduler(opt, cfg, total_steps=40, hardened_at=lambda: hardened[0] if hardened else None)
    rates = []
    for step in range(40):
        if step == 20:
            hardened.append(20)
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cosine = [0.05 * (1 + math.cos(math.pi * s / 40)) for s in range(41)]
    assert rates[:21] == pytest.approx(cosine[:21])  # the step at 20 was computed before hardening was known
    # from step 21 on: the segment [10, 40] of the schedule stretched over the remaining 20 steps
    assert rates[21:] == pytest.approx([0.05 * (1 + math.cos(math.pi * (10 + (s - 20) * 1.5) / 40))
                                        for s in range(21, 40)])
    assert rates[21] > rates[19], "the rate must rise again after hardening"
    with pytest.raises(ConfigError, match="train.lr_rewind"):
        build_config({}, ["train.lr_rewind=1.0"])
    # a fresh schedule for the fixed network is the default; a run saved before the key existed keeps its own
    from cap.engine.config import with_legacy_values

    assert build_config({}).train.lr_rewind == 0
    assert build_config(with_legacy_values({"train": {"epochs": 4}})).train.lr_rewind is None
