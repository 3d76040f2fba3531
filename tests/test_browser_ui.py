"""The headless-browser check of the MLflow UI (tests/browser_ui.py) against a real `mlflow server`."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from tests.browser_ui import check_mlflow_ui, skip_without_browser

pytestmark = [pytest.mark.mlflow, pytest.mark.browser]

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from tests.mlflow_server import MlflowServer  # noqa: E402

# Screenshots stay after the run for a look (git-ignored; CI may upload the folder).
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "browser"

RUNS = {"ui-run-alpha": True, "ui-run-bravo": False, "ui-run-charlie": True}  # name -> tagged pareto=true


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header; fails on anything that is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_mlflow_ui_shows_runs_and_filters_by_tag(tmp_path):
    skip_without_browser()
    with MlflowServer(tmp_path / "mlflow") as server:
        client = MlflowClient(server.uri)
        exp_id = client.create_experiment("browser-ui-check")
        for i, (name, pareto) in enumerate(RUNS.items()):
            run = client.create_run(exp_id, run_name=name, tags={"pareto": "true"} if pareto else {})
            client.log_metric(run.info.run_id, "test_acc", 0.8 + i / 100)
            client.set_terminated(run.info.run_id)

        t0 = time.perf_counter()
        every = check_mlflow_ui(server.uri, "browser-ui-check", list(RUNS), ARTIFACTS / "runs_all.png")
        t1 = time.perf_counter()
        pareto = check_mlflow_ui(server.uri, exp_id, [n for n, p in RUNS.items() if p],
                                 ARTIFACTS / "runs_pareto.png", filter_string="tags.pareto = 'true'",
                                 absent=[n for n, p in RUNS.items() if not p])
        t2 = time.perf_counter()
        print(f"browser check: all runs {t1 - t0:.1f} s, filtered {t2 - t1:.1f} s; "
              f"{every['browser_version']}, playwright-core {every['playwright_version']}")

    assert every["ok"], every
    assert every["experiment_id"] == exp_id
    assert sorted(every["run_names"]) == sorted(RUNS), every
    assert every["matching_runs"] == 3, every

    assert pareto["ok"], pareto
    assert sorted(pareto["run_names"]) == ["ui-run-alpha", "ui-run-charlie"], pareto
    assert "ui-run-bravo" not in pareto["run_names"], pareto
    assert pareto["present_but_absent_expected"] == [], pareto
    assert pareto["matching_runs"] == 2, pareto
    assert "searchFilter=tags.pareto" in pareto["url"], pareto["url"]  # the filter went through the UI

    for result in (every, pareto):
        shot = Path(result["screenshot"])
        assert shot.is_file() and shot.stat().st_size > 0, shot
        width, height = png_size(shot)
        assert width > 0 and height > 0, shot
