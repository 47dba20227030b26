"""Screenshots of the MLflow UI on a study's store, in headless Chromium driven by Playwright
(not run in CI; a check a person looks at).

Starts `mlflow ui` on the store, then shoots:
  experiment.png   the study experiment as a fresh browser opens it (`#/experiments/<id>`)
  runs.png         its run list in the UI's "Model training" view
                   (`#/experiments/<id>/runs?workflowType=machine_learning`), every parent run
                   expanded: one parent per arm (and the base) with its stage runs nested
  compare.png      the comparison of the parent runs (`#/compare-runs`), the whole page

    pip install --target /tmp/pw playwright      # the Python driver only: no browser download
    PYTHONPATH=/tmp/pw python benchmarks/mlflow_screenshots.py --store <study>/mlflow.db \
        --experiment lsp-study-smoke --out benchmarks/results/mlflow_ui

Chromium is the system's (Debian: apt-get install chromium), found on the PATH or `--chromium`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def wait_for(url: str, seconds: float = 90) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"the MLflow UI did not answer at {url} within {seconds:.0f} s")


EXPAND = "button[data-component-id$='runnamecellrenderer.tsx_46']"  # a parent row's [+]


def shoot(page, url: str, path: Path, wait_for: str, expand: bool = False) -> None:
    page.goto(url)
    page.wait_for_selector(wait_for, timeout=90_000)
    page.wait_for_timeout(2_000)
    close = page.get_by_role("button", name="Close")  # the assistant side panel
    if close.count():
        close.first.click()
    if expand:
        for i in range(page.locator(EXPAND).count()):
            page.locator(EXPAND).nth(i).click()
            page.wait_for_timeout(500)
    page.screenshot(path=str(path), full_page=True)
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
    p.add_argument("--wait-for", default="lsp_zero", help="a run name the run list shows when drawn")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/mlflow_ui"))
    p.add_argument("--port", type=int, default=5077)
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = p.parse_args()
    if not args.chromium:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{args.store.resolve()}",
                               "--host", "127.0.0.1", "--port", str(args.port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{args.port}"
    try:
        wait_for(f"{base}/health")
        exp = experiment_id(base, args.experiment)
        runs = parents(base, exp)
        # MLflow 3.17's UI takes the experiment's kind from its GenAI / Model training switch
        # (the URL's workflowType, else the browser's last choice, else GenAI), not from the tag
        query = urllib.parse.urlencode({"runs": json.dumps(runs), "experiments": json.dumps([exp]),
                                        "workflowType": "machine_learning"})
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=FLAGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            shoot(page, f"{base}/#/experiments/{exp}", args.out / "experiment.png", "text=Experiments")
            shoot(page, f"{base}/#/experiments/{exp}/runs?workflowType=machine_learning",
                  args.out / "runs.png", f"text={args.wait_for}", expand=True)
            page.set_viewport_size({"width": 1600, "height": 2400})  # the page scrolls inside
            shoot(page, f"{base}/#/compare-runs?{query}", args.out / "compare.png", "text=Run details")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
