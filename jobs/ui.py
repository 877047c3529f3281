"""lenet-tune ui: the MLflow UI on the configured tracking store.

    lenet-tune ui                      # ./mlflow.db at http://127.0.0.1:5000
    lenet-tune ui --port 5050
With a tracking server (MLFLOW_TRACKING_URI=http://...), open that server instead.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def ui_command(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The `mlflow ui` command line serving tracking_uri's runs and artifacts."""
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
               "--host", host, "--port", str(port),
               # One server process: MLflow's default of four takes a minute to start on 2 cores.
               "--workers", "1"]
    if tracking_uri.startswith("sqlite:///"):
        artifacts = Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts"
        command += ["--artifacts-destination", str(artifacts.resolve())]
    return command


def serve_ui(tracking_uri: str, host: str, port: int) -> int:
    if tracking_uri.startswith(("http://", "https://")):
        print(f"runs are on a tracking server: open {tracking_uri}")
        return 0
    print(f"MLflow UI for {tracking_uri} at http://{host}:{port} (Ctrl-C to stop)", flush=True)
    try:
        return subprocess.call(ui_command(tracking_uri, host, port))
    except KeyboardInterrupt:
        return 0
