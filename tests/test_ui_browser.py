"""The MLflow UI in a real headless Chromium: a sweep's nested runs, a trial's chart, the champion.

A smoke sweep writes a SQLite store, `lenet-tune ui` serves it on a free loopback
port, and Playwright drives Debian's Chromium (installed by .ci/install-browser;
Playwright's own browser download is never used). Screenshots of every page go to
$LENET_TEST_ARTIFACTS, or else to a temporary folder.
"""

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
from helpers import LENET_TUNE

from jobs.cli import main
from jobs.runtime import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run",
                 "--no-proxy-server"]  # loopback stays loopback even where CI sets a proxy
# MLflow 3's UI opens experiments in its GenAI view; this selects the runs-and-models view.
TRAINING_VIEW = "workflowType=machine_learning"
UI_TIMEOUT_MS = 60_000  # a loaded 2-core machine renders slowly
SERVER_START_SECONDS = 180  # the UI starts several uvicorn workers, each importing MLflow

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium not installed: run .ci/install-browser")


@pytest.fixture(scope="module")
def sweep(ray_runtime, tmp_path_factory):
    """`lenet-tune tune --smoke` into a fresh store: a parent run, 3 trial runs, a champion."""
    folder = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{folder}/mlflow.db"
    assert main(["tune", "--smoke", "--name", "browser", "--tracking-uri", uri,
                 "--storage-path", str(folder / "results"), "--data-dir", str(folder / "data")]) == 0
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("lenet-cifar10")
    parent = client.search_runs([experiment.experiment_id], "attributes.run_name = 'browser'")[0]
    trials = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    best = client.get_run(parent.data.tags["best_run_id"])
    champion = client.get_model_version_by_alias("lenet-cifar10", "champion")
    return {"folder": folder, "uri": uri, "experiment_id": experiment.experiment_id, "parent": parent,
            "trials": trials, "best": best, "champion": champion,
            "best_epochs": len(client.get_metric_history(best.info.run_id, "val_acc"))}


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (lenet-tune, mlflow, uvicorn and its workers), then SIGKILL.

    Uvicorn shuts down cleanly on SIGTERM in seconds; Ctrl-C (SIGINT) takes MLflow's job
    consumers half a minute.
    """
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            process.poll()  # reap the group leader so the group can empty
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ui_url(sweep):
    """`lenet-tune ui` on a free loopback port, serving the sweep's store; always stopped afterwards."""
    port = free_port()
    log_path = sweep["folder"] / "ui.log"
    command = [LENET_TUNE, "ui",
               "--tracking-uri", sweep["uri"], "--port", str(port)]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    with open(log_path, "wb") as log:
        # Its own session, so stopping it reaches the servers it spawns and nothing else.
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via $http_proxy
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            if server.poll() is not None:
                pytest.fail(f"lenet-tune ui exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with direct.open(f"{url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /health from {url} after {SERVER_START_SECONDS}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        stop_group(server)


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("LENET_TEST_ARTIFACTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(ui_url):
    """One headless Chromium page that may only reach the UI on loopback."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=UI_TIMEOUT_MS)

    def loopback_only(route):
        if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:  # fonts, docs, telemetry: never leave the machine
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1000})
            context.set_default_timeout(UI_TIMEOUT_MS)
            context.route("**/*", loopback_only)
            yield context.new_page()
        finally:
            browser.close()


def open_route(page, base_url: str, route: str) -> None:
    page.goto(f"{base_url}/#{route}{'&' if '?' in route else '?'}{TRAINING_VIEW}")


def close_assistant(page) -> None:
    """MLflow 3.17 opens an assistant side panel over a third of the page: close it for the screenshots."""
    close = page.locator('button[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.is_visible():
        close.click()


def test_runs_table_shows_the_sweep_with_its_trials_nested(page, ui_url, sweep, screenshots):
    from playwright.sync_api import expect

    open_route(page, ui_url, "/experiments")
    expect(page.get_by_role("link", name="lenet-cifar10", exact=True)).to_be_visible()
    close_assistant(page)
    page.screenshot(path=screenshots / "experiments.png")

    open_route(page, ui_url, f"/experiments/{sweep['experiment_id']}/runs")
    parent_link = page.get_by_role("link", name="browser", exact=True)
    expect(parent_link).to_be_visible()
    expect(page.get_by_text("lenet-cifar10").first).to_be_visible()
    close_assistant(page)
    trial_names = sorted(trial.info.run_name for trial in sweep["trials"])
    assert len(trial_names) == 3
    for name in trial_names:  # nested: hidden until the parent is expanded
        expect(page.get_by_role("link", name=name, exact=True)).to_have_count(0)
    parent_row = page.locator('[role="row"]', has=parent_link)
    parent_row.locator('button[data-component-id*="runnamecellrenderer"]').click()
    for name in trial_names:
        expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
    page.screenshot(path=screenshots / "runs_expanded.png")


def test_trial_page_charts_val_acc_with_a_point_per_epoch(page, ui_url, sweep, screenshots):
    from playwright.sync_api import expect

    best = sweep["best"]
    open_route(page, ui_url, f"/experiments/{sweep['experiment_id']}/runs/{best.info.run_id}/model-metrics")
    expect(page.get_by_role("heading", name=best.info.run_name)).to_be_visible()
    close_assistant(page)
    chart = page.locator("div.react-resizable", has=page.locator('h4[title="val_acc"]'))
    expect(chart).to_have_count(1)
    expect(chart.locator(".js-plotly-plot")).to_be_visible()
    expect(chart.get_by_text(f"{best.info.run_name} (val_acc)")).to_be_visible()  # the series legend
    expect(chart.locator("g.points path.point")).to_have_count(sweep["best_epochs"])
    chart.scroll_into_view_if_needed()
    page.screenshot(path=screenshots / "trial_val_acc.png")


def test_models_page_shows_the_champion_alias(page, ui_url, sweep, screenshots):
    from playwright.sync_api import expect

    version = sweep["champion"].version
    open_route(page, ui_url, "/models/lenet-cifar10")
    expect(page.get_by_role("heading", name="lenet-cifar10")).to_be_visible()
    close_assistant(page)
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {version}", exact=True))
    expect(row).to_have_count(1)
    expect(row.locator('[title="champion"]')).to_be_visible()
    page.screenshot(path=screenshots / "model_champion.png")
