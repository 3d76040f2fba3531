"""A real `mlflow server` for tests: start, kill (whole process group), restart on the same port and DB.

    with MlflowServer(tmp_path) as server:   # started; server.uri = "http://127.0.0.1:<port>"
        server.kill()                         # gone at once, like a crashed host
        server.start()                        # back, same port, same database and artifacts

`mlflow server` runs uvicorn in a child process, so stopping only the CLI process would leave the
worker serving: the server gets its own session (process group) and the group is killed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class MlflowServer:
    """`mlflow server` with a sqlite store and proxied artifacts under `root`."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.start_seconds: list[float] = []  # wall time of each start until /health answered

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def start(self, timeout: float = 120.0) -> float:
        """Start and wait for /health; returns the seconds it took."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("server already running")
        if _port_open(self.port):  # another server there would answer /health in our place
            raise RuntimeError(f"port {self.port} is already in use")
        mlflow = Path(sys.executable).parent / "mlflow"
        cmd = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.db}",
               "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        t0 = time.perf_counter()
        with open(self.log_file, "a") as log:
            log.write(f"\n--- start {time.strftime('%H:%M:%S')}: {' '.join(cmd)}\n")
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                         start_new_session=True)
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        seconds = time.perf_counter() - t0
                        self.start_seconds.append(seconds)
                        return seconds
            except OSError:
                pass
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"mlflow server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> None:
        """Signal the whole process group and wait until the port is closed."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout)
        self.proc = None
        deadline = time.perf_counter() + timeout
        while _port_open(self.port):  # the uvicorn worker is in the group; wait until it is gone too
            if time.perf_counter() > deadline:
                raise TimeoutError(f"port {self.port} still open after killing the server")
            time.sleep(0.05)

    def stop(self) -> None:
        """Graceful stop (SIGTERM), then SIGKILL if it lingers."""
        self.kill(signal.SIGTERM, timeout=10.0)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_file.read_text()[-chars:]
        except FileNotFoundError:
            return ""

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
