"""Approval in the Prefect UI, in a real browser: a real `prefect server start`, the
pipeline paused in another process, headless Chromium fills the approval form.

Runs where Chromium and ChromeDriver are installed (CI installs them:
``apt-get install -y chromium chromium-driver``). ZDR_UPDATE_SCREENSHOTS=1 also
saves the form to docs/approval-form.png.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import zdr
from tests.support import balances, seed, wait_for

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="needs Chromium and ChromeDriver: apt-get install -y chromium chromium-driver",
    ),
]

PIPELINE = """
import json, sys
from zdr.flows.zero_downtime_replay import zero_downtime_replay
summary = zero_downtime_replay(
    replay_key="ui_gate",
    projectors=["zdr.examples.bank.projectors:BalancesV2"],
    database_url=sys.argv[1],
    approval_timeout_s=300,
)
print(json.dumps(summary.model_dump()))
"""


def test_approving_in_the_prefect_ui_promotes_the_replay(
    prefect_server, manager, engine, database_url
):
    seed(manager.store, 1_000)
    manager.project_live()
    stop = threading.Event()
    runner = threading.Thread(target=manager.follow, kwargs={"stop": stop, "poll_interval": 0.05})
    runner.start()
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PYTHONPATH": str(ROOT)}
    pipeline = subprocess.Popen(
        [sys.executable, "-c", PIPELINE, database_url],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    browser = _chromium()
    try:
        run_id = _wait_for_paused_run(prefect_server, "ui_gate", pipeline)
        _approve_in_ui(browser, prefect_server, run_id, approver="ops-dana", comment="rows match")
        output, errors = pipeline.communicate(timeout=120)
        _see_outcome_in_ui(browser, prefect_server, run_id, "Promoted")
    finally:
        browser.quit()
        if pipeline.poll() is None:
            pipeline.kill()
        stop.set()
        runner.join(10)
    assert pipeline.returncode == 0, errors[-3000:]
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["promoted"] and summary["approver"] == "ops-dana"
    assert summary["comment"] == "rows match"
    assert manager.get_replay("ui_gate").state is zdr.ReplayState.LIVE
    assert "deposits" in next(iter(balances(engine).values()))
    assert _final_state_name(prefect_server, run_id) == "Promoted"


def _approve_in_ui(browser, api: str, run_id: str, *, approver: str, comment: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(f"{api.removesuffix('/api')}/runs/flow-run/{run_id}")
    wait.until(ready.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Resume']")))
    browser.find_element(By.XPATH, "//button[normalize-space()='Resume']").click()
    wait.until(ready.visibility_of_element_located((By.XPATH, _field("Approver", "textarea"))))
    browser.find_element(By.XPATH, _field("Approver", "textarea")).send_keys(approver)
    browser.find_element(By.XPATH, _field("Comment (Optional)", "textarea")).send_keys(comment)
    # Sent with a name and no choice, the form is refused: nobody rejects by accident.
    browser.find_element(By.XPATH, "//button[normalize-space()='Submit']").click()
    time.sleep(2)
    assert _still_paused(api, run_id), "a form without a decision resumed the run"
    if os.environ.get("ZDR_UPDATE_SCREENSHOTS"):
        browser.save_screenshot(str(ROOT / "docs" / "approval-form.png"))
    decision = Select(browser.find_element(By.XPATH, _field("Decision", "select[option]")))
    assert [o.get_attribute("value") for o in decision.options] == ["approve", "reject"]
    decision.select_by_value("approve")
    browser.find_element(By.XPATH, "//button[normalize-space()='Submit']").click()


def _see_outcome_in_ui(browser, api: str, run_id: str, outcome: str) -> None:
    """The run's page and the runs list filtered by the replay's tag show the outcome."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(f"{api.removesuffix('/api')}/runs/flow-run/{run_id}")
    wait.until(lambda b: outcome in b.find_element(By.TAG_NAME, "body").text)
    browser.get(f"{api.removesuffix('/api')}/runs?tags=replay%3Aui_gate")
    wait.until(lambda b: "replay-ui-gate-" in b.find_element(By.TAG_NAME, "body").text)
    if os.environ.get("ZDR_UPDATE_SCREENSHOTS"):
        time.sleep(1.0)
        browser.save_screenshot(str(ROOT / "docs" / "runs-by-replay-key.png"))


def _final_state_name(api: str, run_id: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state.name


def _still_paused(api: str, run_id: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state.is_paused()


def _field(label: str, control: str) -> str:
    """XPath of the control of the schema-form property whose label is ``label``."""
    return (
        f"//span[@class='schema-form-property__label' and normalize-space()='{label}']"
        "/ancestor::div[contains(concat(' ', normalize-space(@class), ' '),"
        f" ' schema-form-property ')][1]//{control}"
    )


def _wait_for_paused_run(api: str, key: str, pipeline: subprocess.Popen) -> str:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from zdr.flows.approval import NoPausedRun, find_paused_run

    found: list[str] = []

    def paused() -> bool:
        if pipeline.poll() is not None:
            raise AssertionError(f"the pipeline ended early: {pipeline.stderr.read()[-3000:]}")
        with temporary_settings({PREFECT_API_URL: api}):
            try:
                found.append(str(find_paused_run(key)))
                return True
            except NoPausedRun:
                return False

    wait_for(paused, timeout=120, interval=0.5)
    return found[-1]


def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1200",
    ):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='zdr-chromium-')}")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
