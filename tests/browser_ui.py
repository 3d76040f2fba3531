"""A real headless-browser look at the MLflow UI: Debian's chromium driven by playwright-core (tests/browser/).

    reason = browser_unavailable_reason()      # None when chromium and node exist, else why not
    result = check_mlflow_ui(server.uri, "sweep", ["tau-0.3"], tmp_path / "ui.png",
                             filter_string="tags.pareto = 'true'", absent=["tau-1.2"])
    assert result["ok"], result                # result["run_names"]: the run names the runs table shows

The Node script tests/browser/mlflow_ui.js does the browsing and documents the result's fields. Its
node_modules come from the committed package-lock.json (`npm ci`, done here on first use; a second call only
compares versions). No browser is downloaded: playwright-core drives the chromium that apt installed.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

BROWSER_DIR = Path(__file__).resolve().parent / "browser"
SCRIPT = BROWSER_DIR / "mlflow_ui.js"
MIN_NODE_MAJOR = 18  # playwright-core 1.61.x; 1.62+ needs Node 20, newer than Debian 12's nodejs (18.20)


class BrowserCheckError(RuntimeError):
    """The check could not be made (no browser, server unreachable, filter rejected, table never rendered)."""


def chromium_path() -> str | None:
    """$CAP_CHROMIUM, else Debian's /usr/bin/chromium (or chromium-browser) on PATH."""
    env = os.environ.get("CAP_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _node_major(node: str) -> int | None:
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.match(r"v(\d+)\.", out.strip())
    return int(m.group(1)) if m else None


def _installed() -> bool:
    """node_modules holds the playwright-core version the lock file pins."""
    try:
        lock = json.loads((BROWSER_DIR / "package-lock.json").read_text())
        pinned = lock["packages"]["node_modules/playwright-core"]["version"]
        have = json.loads((BROWSER_DIR / "node_modules/playwright-core/package.json").read_text())["version"]
    except (OSError, KeyError, ValueError):
        return False
    return have == pinned


def browser_unavailable_reason() -> str | None:
    """None when the browser check can run here; else why not (for pytest.skip)."""
    if chromium_path() is None:
        where = os.environ.get("CAP_CHROMIUM") or "chromium on PATH"
        return f"no chromium ({where}): apt-get install chromium, or run tools/bootstrap.sh"
    node = shutil.which("node")
    if node is None:
        return "no node on PATH: apt-get install nodejs npm, or run tools/bootstrap.sh"
    major = _node_major(node)
    if major is None or major < MIN_NODE_MAJOR:
        return f"node {major} at {node} is too old: playwright-core needs Node >= {MIN_NODE_MAJOR}"
    if not _installed() and shutil.which("npm") is None:
        return f"no npm on PATH to install {BROWSER_DIR}/node_modules: apt-get install npm"
    return None


def skip_without_browser() -> None:
    """pytest.skip, with the reason, where the browser check cannot run here."""
    import pytest

    reason = browser_unavailable_reason()
    if reason:
        pytest.skip(reason)


def ensure_node_modules(timeout: float = 600.0) -> None:
    """`npm ci` in tests/browser unless node_modules already holds the pinned playwright-core (idempotent;
    a file lock keeps parallel callers from installing at the same time)."""
    if _installed():
        return
    with open(BROWSER_DIR / ".npm-install.lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if _installed():
            return
        npm = shutil.which("npm")
        if npm is None:
            raise BrowserCheckError("npm not found: cannot install tests/browser/node_modules")
        cmd = [npm, "ci", "--no-audit", "--no-fund"]
        proc = subprocess.run(cmd, cwd=BROWSER_DIR, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not _installed():
            raise BrowserCheckError(f"{' '.join(cmd)} in {BROWSER_DIR} failed ({proc.returncode}):\n"
                                    f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        (BROWSER_DIR / "node_modules/.cap-installed").touch()  # the stamp tools/bootstrap.sh checks


def check_mlflow_ui(base_url: str, experiment: str, expect: list[str], screenshot: Path,
                    filter_string: str | None = None, *, absent: list[str] | None = None,
                    expand_nested: bool = False, link: str | None = None, table: bool = True,
                    timeout_s: float = 60.0) -> dict:
    """Open the runs page of `experiment` (name or id) in the MLflow UI at `base_url`, optionally type
    `filter_string` into the runs search box and submit it, take a full-page screenshot, and return the
    script's result: ok, found, missing (of `expect`), present_but_absent_expected (of `absent`), run_names,
    matching_runs, url, screenshot, timings, browser_version, playwright_version.

    `ok` is False when an expected text is missing or an `absent` one is visible; the dict is returned so the
    caller can assert on it. Raises BrowserCheckError when the check could not be made at all.
    `expand_nested` clicks every top-level run's expander first (a sweep's trials are nested under its parent
    run, collapsed). `link` opens that URL instead of the runs page (`experiment` still names its experiment);
    `table=False` checks only the texts (a page without a runs table). `timeout_s` bounds each wait inside the
    page (load, filter, texts)."""
    reason = browser_unavailable_reason()
    if reason:
        raise BrowserCheckError(reason)
    ensure_node_modules()
    args = {"base_url": base_url, "experiment": str(experiment), "expect": list(expect),
            "absent": list(absent or []), "screenshot": str(Path(screenshot).resolve()),
            "timeout_ms": int(timeout_s * 1000), "chromium": chromium_path()}
    if filter_string:
        args["filter"] = filter_string
    if expand_nested:
        args["expand"] = True
    if link:
        args["link"] = link
    if not table:
        args["table"] = False
    # the script's own waits are bounded; this outer limit only catches a hung browser
    limit = 4 * timeout_s + 120
    try:
        proc = subprocess.run([shutil.which("node") or "node", str(SCRIPT), "-"], input=json.dumps(args),
                              capture_output=True, text=True, timeout=limit, cwd=BROWSER_DIR)
    except subprocess.TimeoutExpired as e:
        raise BrowserCheckError(f"mlflow_ui.js did not finish within {limit:.0f} s") from e
    try:
        result = json.loads(proc.stdout)
    except ValueError as e:
        raise BrowserCheckError(f"mlflow_ui.js exited {proc.returncode} without a JSON result:\n"
                                f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-3000:]}") from e
    result["returncode"] = proc.returncode
    if proc.returncode not in (0, 1):
        raise BrowserCheckError(f"MLflow UI check failed: {result.get('error')} (screenshot: "
                                f"{result.get('screenshot')}; stderr: {proc.stderr[-1500:]})")
    return result
