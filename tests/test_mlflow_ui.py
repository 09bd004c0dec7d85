"""The MLflow UI in headless Chromium, on a store made by a real short training run and an
evaluate run: the run page shows the run, a validation metric, a parameter and the panel."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import IN_CI, REPO, free_port, mlflow_run, port_open

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not IN_CI:
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None and not IN_CI, reason="Chromium is not installed (apt-get install chromium)"),
]
# no network here: without these Chromium keeps trying to reach Google's services
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(os.environ.get("TUMORSEG_SCREENSHOT_DIR", REPO / "test-artifacts"))


@pytest.fixture
def mlflow_ui(trained, evaluated, tmp_path):
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    log = (tmp_path / "mlflow-ui.log").open("w")
    server = subprocess.Popen(
        [
            str(mlflow),
            "ui",
            "--backend-store-uri",
            f"sqlite:///{trained}/mlflow/mlruns.db",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read() == b"OK":
                    break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, (tmp_path / "mlflow-ui.log").read_text()[-2000:]
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the UI serves from child processes: stop the group
        server.wait(timeout=30)
        log.close()
    deadline = time.time() + 10
    while port_open(port) and time.time() < deadline:
        time.sleep(0.2)
    assert not port_open(port), f"port {port} still open after stopping the MLflow UI"


def test_run_page_shows_run_metric_parameter_and_panel(mlflow_ui, trained, tmp_path):
    _, run = mlflow_run(trained / "mlflow", "train")
    page_url = f"{mlflow_ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1600, "height": 2400},
        )
        try:
            page = browser.new_page()
            page.goto(page_url)
            for text in (run.info.run_name, "val_mean_dice", "loss_w_dice", "brain_tumor_mri_seg"):
                page.get_by_text(text).first.wait_for(state="visible", timeout=60_000)
            page.screenshot(path=str(SCREENSHOTS / "mlflow-run-page.png"))

            page.goto(f"{page_url}/artifacts/panels/epoch_002.png")
            page.get_by_text("epoch_002.png").first.wait_for(state="visible", timeout=60_000)
            picture = page.locator("img[src^='blob:']").first
            picture.wait_for(state="visible", timeout=60_000)
            assert picture.evaluate("img => img.naturalWidth") >= 3 * 64  # a decoded panel, not a broken image
            page.screenshot(path=str(SCREENSHOTS / "mlflow-validation-panel.png"))
        finally:
            browser.close()
