"""Screenshots of the MLflow UI on a study's store, taken by headless Chromium (not run in CI).

Starts `mlflow ui` on the store, then shoots, at 1600x1000:
  experiment.png   the study experiment as the UI opens it (`#/experiments/<id>`: the run list,
                   parents per arm with their stage runs nested, when the experiment is marked
                   as a training experiment; MLflow 3 opens unmarked ones on GenAI traces)
  runs.png         the run list (`#/experiments/<id>/runs`)
  compare.png      the comparison of the arms' parent runs (`#/compare-runs`)

    python benchmarks/mlflow_screenshots.py --store <study>/mlflow.db --experiment lsp-study-smoke \
        --out benchmarks/results/mlflow_ui

Needs Chromium (Debian: apt-get install chromium). Chromium's own `--screenshot` is used, with a
virtual-time budget so that the page's JavaScript has fetched and drawn the runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1600,1000", "--virtual-time-budget=15000"]


def wait_for(url: str, seconds: float = 90) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"the MLflow UI did not answer at {url} within {seconds:.0f} s")


def shoot(chromium: str, url: str, path: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={path}", url],
                       check=True, capture_output=True, timeout=120)
    print(f"{path} <- {url}")


def parents(base: str, experiment_id: str) -> list[str]:
    """The arms' parent runs, through the UI server's REST API."""
    body = json.dumps({"experiment_ids": [experiment_id], "max_results": 100,
                       "filter": "tags.`lsp.role` = 'parent'"}).encode()
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return [r["info"]["run_id"] for r in json.load(resp).get("runs", [])]


def experiment_id(base: str, name: str) -> str:
    query = urllib.parse.urlencode({"experiment_name": name})
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?{query}", timeout=10) as resp:
        return json.load(resp)["experiment"]["experiment_id"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, required=True, help="the study's mlflow.db")
    p.add_argument("--experiment", default="lsp-study-smoke")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/mlflow_ui"))
    p.add_argument("--port", type=int, default=5077)
    args = p.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{args.store.resolve()}",
                               "--host", "127.0.0.1", "--port", str(args.port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{args.port}"
    try:
        wait_for(f"{base}/health")
        exp = experiment_id(base, args.experiment)
        shoot(chromium, f"{base}/#/experiments/{exp}", args.out / "experiment.png")
        shoot(chromium, f"{base}/#/experiments/{exp}/runs", args.out / "runs.png")
        runs = parents(base, exp)
        query = urllib.parse.urlencode({"runs": json.dumps(runs), "experiments": json.dumps([exp])})
        shoot(chromium, f"{base}/#/compare-runs?{query}", args.out / "compare.png")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
