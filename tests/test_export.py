"""Export: the compact model (plain layers, no gates) equals the gated network it came from, for networks
pruned in many ways; its MACs and params equal what training reports and an independent counter; ONNX
through onnxruntime; malformed or mismatched arch.json rejected."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from cap.core.arch import architecture
from cap.core.blocks import GatedBlock
from cap.core.complexity import deterministic_values, expected_cost
from cap.core.gates import Gate, set_gate_mode
from cap.core.surgery import remove_block, remove_units
from cap.deploy import ExportError, compact_from_gated, count_macs_params, export, load_compact
from cap.models import create_model

ROOT = Path(__file__).resolve().parents[1]


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Trained-looking BN statistics and affine parameters, so that equality is not trivial."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def pruned(name: str, how: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name, **kw)
    blocks = list(model.blocks())
    if how == "every_stage":  # a block removed in every stage, units removed elsewhere
        for s in range(len(model.stages)):
            remove_block(model, model.stages[s][-1])
        b = model.stages[0][0]
        remove_units(b, b.unit_gates()[0], torch.tensor([0, 3, 5]))
    elif how == "one_unit":  # a block left with a single unit
        remove_units(blocks[1], blocks[1].unit_gates()[0], torch.tensor([2]))
    elif how == "bottleneck_both":  # both internal convs of a bottleneck pruned
        gate1, gate2 = blocks[2].unit_gates()
        remove_units(blocks[2], gate1, torch.arange(0, gate1.size, 3))
        remove_units(blocks[2], gate2, torch.arange(1, gate2.size, 2))
        remove_block(model, blocks[5])
    elif how == "not_hardened":  # nothing removed yet: the deterministic gates decide (theta < 0.5 is off)
        blocks[0].unit_gates()[0].theta[torch.tensor([1, 4])] = 0.2
        blocks[3].layer_gate.theta.fill_(0.3)
        blocks[4].unit_gates()[0].theta[torch.arange(0, 16, 2)] = 0.4
    randomise(model, 1)
    return model.eval()


CASES = [("resnet20", "every_stage", {"num_classes": 10, "in_channels": 1, "input_size": 32}),
         ("resnet20", "one_unit", {"num_classes": 10, "in_channels": 1, "input_size": 32}),
         ("resnet20", "not_hardened", {"num_classes": 10, "in_channels": 3, "input_size": 32}),
         ("resnet50", "bottleneck_both", {"num_classes": 7, "in_channels": 3, "input_size": 64})]


def run_folder(tmp_path: Path, model: torch.nn.Module, name: str, kwargs: dict) -> Path:
    """What `cap train` leaves: model.pt with the surviving architecture and the state_dict."""
    folder = tmp_path / "run"
    folder.mkdir()
    torch.save({"arch": architecture(model, name, kwargs), "state_dict": model.state_dict()}, folder / "model.pt")
    return folder


@pytest.mark.parametrize("name,how,kwargs", CASES, ids=[c[1] for c in CASES])
def test_export_round_trip_equals_the_gated_network(tmp_path, name, how, kwargs):
    model = pruned(name, how, **kwargs)
    set_gate_mode(model, "deterministic")
    export(run_folder(tmp_path, model, name, kwargs), tmp_path / "out")
    compact = load_compact(tmp_path / "out")
    assert not any(isinstance(m, (Gate, GatedBlock)) for m in compact.modules()), "no gate code may remain"
    x = torch.randn(4, kwargs["in_channels"], kwargs["input_size"], kwargs["input_size"])
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=1e-5, atol=1e-5)
    reported = expected_cost(model, deterministic_values)  # what training's summary reports
    macs, params = count_macs_params(compact, kwargs["input_size"], kwargs["in_channels"])  # FlopCounterMode
    arch = json.loads((tmp_path / "out" / "arch.json").read_text())
    assert macs == int(round(float(reported.macs))) == arch["macs"]
    assert params == int(round(float(reported.params))) == arch["params"]


def test_round_to_pads_widths_without_changing_outputs(tmp_path):
    kwargs = {"num_classes": 10, "in_channels": 1, "input_size": 32}
    model = pruned("resnet20", "every_stage", **kwargs)
    set_gate_mode(model, "deterministic")
    folder = run_folder(tmp_path, model, "resnet20", kwargs)
    export(folder, tmp_path / "plain")
    export(folder, tmp_path / "r8", round_to=8)
    plain, rounded = load_compact(tmp_path / "plain"), load_compact(tmp_path / "r8")
    arch = json.loads((tmp_path / "r8" / "arch.json").read_text())
    assert all(w % 8 == 0 for b in arch["blocks"] if not b["removed"] for w in b["widths"])
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rounded(x), plain(x), rtol=1e-5, atol=1e-5)
    assert arch["macs"] > json.loads((tmp_path / "plain" / "arch.json").read_text())["macs"]


def test_onnx_export_matches_torch_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    kwargs = {"num_classes": 10, "in_channels": 1, "input_size": 32}
    model = pruned("resnet20", "every_stage", **kwargs)
    set_gate_mode(model, "deterministic")
    path = export(run_folder(tmp_path, model, "resnet20", kwargs), tmp_path / "onnx", "onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch dimension is dynamic
        x = torch.randn(batch, 1, 32, 32)
        (out,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            assert float((torch.from_numpy(out) - model(x)).abs().max()) < 1e-4


def test_torchscript_export_runs_without_cap(tmp_path):
    kwargs = {"num_classes": 10, "in_channels": 1, "input_size": 32}
    model = pruned("resnet20", "one_unit", **kwargs)
    set_gate_mode(model, "deterministic")
    path = export(run_folder(tmp_path, model, "resnet20", kwargs), tmp_path / "ts", "torchscript")
    code = (f"import torch; m = torch.jit.load({str(path)!r}); x = torch.load({str(tmp_path / 'x.pt')!r}); "
            f"torch.save(m(x), {str(tmp_path / 'y.pt')!r})")
    x = torch.randn(2, 1, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)  # a process that never imports cap
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(x), rtol=1e-5, atol=1e-5)


def test_exported_program_runs_without_cap(tmp_path):
    """--format exported_program: a .pt2 that torch.export.load reads in a process that never imports cap,
    with a dynamic batch, and outputs equal to the compact model's."""
    kwargs = {"num_classes": 10, "in_channels": 1, "input_size": 32}
    model = pruned("resnet20", "every_stage", **kwargs)
    set_gate_mode(model, "deterministic")
    path = export(run_folder(tmp_path, model, "resnet20", kwargs), tmp_path / "ep", "exported_program")
    assert path.name == "model.pt2"
    code = (f"import sys, torch; m = torch.export.load({str(path)!r}).module(); "
            f"xs = torch.load({str(tmp_path / 'x.pt')!r}); torch.save([m(x) for x in xs], {str(tmp_path / 'y.pt')!r}); "
            "assert 'cap' not in sys.modules")
    xs = [torch.randn(batch, 1, 32, 32) for batch in (1, 2, 5)]  # the batch dimension is dynamic
    torch.save(xs, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    compact = load_compact(path.parent)
    with torch.no_grad():
        for x, y in zip(xs, torch.load(tmp_path / "y.pt"), strict=True):
            assert torch.equal(y, compact(x))


def option_a_pruned() -> torch.nn.Module:
    """A hardened ResNet-20 with option-A shortcuts both in kept blocks and in a removed one."""
    model = pruned("resnet20", "every_stage", num_classes=10, in_channels=1, input_size=32)
    remove_block(model, model.stages[1][0])  # the first block of stage 2: its option-A shortcut alone is left
    set_gate_mode(model, "deterministic")
    return model


def test_zero_pad_shortcut_is_option_a_bit_for_bit():
    """The export's torch.cat shortcut computes exactly what the training model's F.pad shortcut does."""
    from cap.core.blocks import OptionAShortcut
    from cap.deploy.compact import ShortcutBlock, ZeroPadShortcut

    for cin, cout, stride in ((16, 32, 2), (5, 12, 2), (4, 7, 1)):  # even and odd padding
        option_a = OptionAShortcut(cin, cout, stride)
        x = torch.randn(3, cin, 9, 9)
        assert torch.equal(ZeroPadShortcut.from_option_a(option_a)(x), option_a(x))
    model = option_a_pruned()
    compact = compact_from_gated(model)
    shortcuts = [b.shortcut for b in compact.blocks if isinstance(b.shortcut, ZeroPadShortcut)]
    assert len(shortcuts) == 2 and isinstance(compact.blocks[2], ShortcutBlock)
    assert not compact.blocks[2].needs_relu
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(compact(x), model(x))  # hardened: the gated network, bit for bit


def test_torch_pruning_and_fx_trace_the_export(tmp_path):
    """Other graph tools read the export: torch.fx traces it, and Torch-Pruning maps the residual streams
    through the zero-pad shortcuts (F.pad made it fail with an IndexError) and prunes them further."""
    tp = pytest.importorskip("torch_pruning")
    kwargs = {"num_classes": 10, "in_channels": 1, "input_size": 32}
    compact = load_compact(export(run_folder(tmp_path, option_a_pruned(), "resnet20", kwargs), tmp_path / "o").parent)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(torch.fx.symbolic_trace(compact)(x), compact(x))
    macs, params = count_macs_params(compact, 32, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TP notes the shortcut's zeros as parameters outside a known layer
        graph = tp.DependencyGraph().build_dependency(compact, example_inputs=x)
        # one stem channel runs through every stage's stream: TP follows it through both shortcuts
        graph.get_pruning_group(compact.stem[0], tp.prune_conv_out_channels, idxs=[3]).prune()
        assert (compact.stem[0].out_channels, compact.fc.in_features) == (15, 63)
        pruner = tp.pruner.MetaPruner(compact, x, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                      pruning_ratio=0.25, ignored_layers=[compact.fc])
        pruner.step()
    assert compact(x).shape == (2, 10)
    assert all(b.branch[0].out_channels < 16 * 2 ** (i // 3) for i, b in enumerate(compact.blocks)
               if hasattr(b, "branch")), "every kept block's internal width is pruned further"
    assert compact.fc.in_features < 63, "the last stream loses channels too (its zero-pad channels go first)"
    assert count_macs_params(compact, 32, 1) < (macs, params)


def test_old_exports_without_the_shortcut_zeros_still_load(exported):
    """model.pt written before the zero-pad shortcut holds no zeros_front/zeros_back: they are filled in."""
    state = torch.load(exported / "model.pt", weights_only=True)
    reference = load_compact(exported)
    torch.save({k: v for k, v in state.items() if ".zeros_" not in k}, exported / "model.pt")
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_compact(exported)(x), reference(x))


def test_weights_that_do_not_fit_are_named_in_one_line(exported):
    arch = json.loads((exported / "arch.json").read_text())
    arch["blocks"][1].update(widths=[5])
    (exported / "arch.json").write_text(json.dumps(arch))
    with pytest.raises(ExportError) as info:
        load_compact(exported)
    message = str(info.value)
    assert "\n" not in message and "loading state_dict" not in message, message
    assert message.endswith("model.pt does not fit " + str(exported / "arch.json") + ": blocks.1.branch.0.weight "
                            "is [1, 16, 3, 3] in the file, the structure needs [5, 16, 3, 3] (and 5 more)"), message
    (exported / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(ExportError, match="model.pt is not a readable state_dict"):
        load_compact(exported)


@pytest.fixture()
def exported(tmp_path) -> Path:
    kwargs = {"num_classes": 10, "in_channels": 1, "input_size": 32}
    model = pruned("resnet20", "one_unit", **kwargs)
    set_gate_mode(model, "deterministic")
    return export(run_folder(tmp_path, model, "resnet20", kwargs), tmp_path / "out").parent


@pytest.mark.parametrize("damage,message", [
    (lambda a: a.update(format="something-else"), "'format' must be"),
    (lambda a: a.update(name="resnet999"), "does not describe a model"),
    (lambda a: a["blocks"][1].update(widths=[99]), "outside 1..16"),
    (lambda a: a["blocks"][1].update(widths=[5]), "does not fit"),
    (lambda a: a["blocks"].pop(), "architecture lists 8 blocks"),
])
def test_malformed_or_mismatched_arch_is_rejected(exported, damage, message):
    arch = json.loads((exported / "arch.json").read_text())
    damage(arch)
    (exported / "arch.json").write_text(json.dumps(arch))
    with pytest.raises(ExportError, match=message):
        load_compact(exported)


def test_broken_files_are_rejected(exported):
    (exported / "arch.json").write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        load_compact(exported)
    (exported / "arch.json").unlink()
    with pytest.raises(ExportError, match="arch.json does not exist"):
        load_compact(exported)


def test_cli_export(tmp_path):
    kwargs = {"num_classes": 10, "in_channels": 1, "input_size": 32}
    model = pruned("resnet20", "every_stage", **kwargs)
    folder = run_folder(tmp_path, model, "resnet20", kwargs)
    done = subprocess.run([sys.executable, "-m", "cap", "export", str(folder), "--format", "onnx", "--round-to", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (folder / "export" / "model.onnx").is_file() and (folder / "export" / "arch.json").is_file()
    assert "MACs" in done.stdout
    done = subprocess.run([sys.executable, "-m", "cap", "export", str(folder), "--format", "exported_program"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and (folder / "export" / "model.pt2").is_file(), done.stderr
    bad = subprocess.run([sys.executable, "-m", "cap", "export", str(tmp_path / "nope")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "model.pt does not exist" in bad.stderr


def test_an_emptied_unit_layer_removes_the_block():
    """As in hardening (docs/method.md): a block whose internal layer loses every unit goes as a whole."""
    from cap.deploy.compact import ShortcutBlock

    model = create_model("resnet20", num_classes=10, in_channels=1, input_size=32)
    randomise(model, 2)
    list(model.blocks())[4].unit_gates()[0].theta.fill_(0.1)
    compact = compact_from_gated(model)
    assert isinstance(compact.blocks[4], ShortcutBlock)
    assert not compact.blocks[4].needs_relu  # identity shortcut of a ReLU output: the ReLU is a no-op, left out
    from cap.core.blocks import ProjectionShortcut
    assert ShortcutBlock(ProjectionShortcut(4, 8, 2)).needs_relu  # a projection can go negative: ReLU kept
    model.eval()
    set_gate_mode(model, "deterministic")  # the evaluated network drops that block too, and so do its costs
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=1e-5, atol=1e-5)
    reported = expected_cost(model, deterministic_values)
    assert count_macs_params(compact, 32, 1) == (int(reported.macs), int(reported.params))


def test_a_model_built_from_a_pruned_architecture_replays_it_without_changes():
    """Resuming a model.arch run replays the checkpoint's architecture on a model that starts pruned."""
    from cap.core.arch import removal_plan_for
    from cap.models import build_from_architecture

    model = pruned("resnet20", "every_stage", num_classes=10, in_channels=1, input_size=32)
    spec = architecture(model, "resnet20", {"num_classes": 10, "in_channels": 1, "input_size": 32})
    rebuilt = build_from_architecture(spec)
    assert not removal_plan_for(rebuilt, spec)
    spec["blocks"][2]["removed"] = False
    spec["blocks"][2]["widths"] = [16]
    with pytest.raises(ValueError, match="removed in the model but kept"):
        removal_plan_for(rebuilt, spec)


def test_compact_from_gated_leaves_the_gated_model_alone():
    kwargs = {"num_classes": 10, "in_channels": 1, "input_size": 32}
    model = pruned("resnet20", "not_hardened", **kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compact_from_gated(model, round_to=8)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_training_a_pruned_architecture_from_scratch(tmp_path):
    from cap.engine.config import load_config
    from cap.engine.run import run

    kwargs = {"num_classes": 10, "in_channels": 1, "input_size": 32, "width": 16}
    model = pruned("resnet20", "not_hardened", **kwargs)
    folder = run_folder(tmp_path, model, "resnet20", kwargs)
    cfg = load_config("configs/smoke.yaml", [f"model.arch={folder / 'model.pt'}", "prune.tau=0", "train.epochs=1",
                                             "train.max_steps_per_epoch=2", "train.progress=false",
                                             "tracking.enabled=false"])
    summary = run(cfg, tmp_path / "scratch", log=lambda _: None)
    compact = compact_from_gated(model)
    assert summary["macs_final"] == count_macs_params(compact, 32, 1)[0], "the deterministic structure is trained"
    assert summary["layers_kept"] == sum(1 for b in compact.blocks if b.__class__.__name__ == "PlainBlock")
    trained = torch.load(tmp_path / "scratch" / "model.pt", weights_only=True)["state_dict"]
    assert not torch.equal(trained["stem.0.weight"], model.state_dict()["stem.0.weight"]), "fresh weights"


def test_a_failed_export_leaves_the_earlier_one_intact(tmp_path):
    kwargs = {"num_classes": 10, "in_channels": 1, "input_size": 32}
    model = pruned("resnet20", "every_stage", **kwargs)
    folder = run_folder(tmp_path, model, "resnet20", kwargs)
    good = subprocess.run([sys.executable, "-m", "cap", "export", str(folder)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    before = {p.name: p.read_bytes() for p in (folder / "export").iterdir()}
    bad = subprocess.run([sys.executable, "-m", "cap", "export", str(folder), "--round-to", "64"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr  # 64 is past stage 1's dense width
    assert {p.name: p.read_bytes() for p in (folder / "export").iterdir()} == before
    load_compact(folder / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["export", "model.pt"], "no temporary folder may stay"


def test_an_export_replaces_the_earlier_one_whole(tmp_path):
    kwargs = {"num_classes": 10, "in_channels": 1, "input_size": 32}
    folder = run_folder(tmp_path, pruned("resnet20", "one_unit", **kwargs), "resnet20", kwargs)
    export(folder, tmp_path / "out", "torchscript")
    export(folder, tmp_path / "out", round_to=8)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["arch.json", "model.pt"], \
        "a model.ts of the earlier export must not sit beside the new arch.json"
    assert all(w % 8 == 0 for b in json.loads((tmp_path / "out" / "arch.json").read_text())["blocks"]
               if not b["removed"] for w in b["widths"])


def test_export_into_a_folder_of_other_files_or_a_file_is_refused(tmp_path):
    kwargs = {"num_classes": 10, "in_channels": 1, "input_size": 32}
    folder = run_folder(tmp_path, pruned("resnet20", "one_unit", **kwargs), "resnet20", kwargs)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match=r"holds files that are not an export \(notes.txt\)"):
        export(folder, tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    with pytest.raises(ExportError, match="is a file"):
        export(folder, tmp_path / "mine" / "notes.txt")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
