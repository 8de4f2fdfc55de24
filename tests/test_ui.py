"""The MLflow UI shows a search as a person sees it: headless Chromium (Debian's `chromium`
and `chromium-driver`, driven by Selenium) opens the experiment page and the runs-compare
view of a tiny real search logged through mlflow/server.sh, and saves screenshots.

Needs `apt-get install chromium chromium-driver`: skipped without them, except in CI (CI=true),
where that is a failure.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from test_tracking import MlflowServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TAIL_METRIC = "val/tail/ndcg_10"
RENDER_TIMEOUT_S = 90  # the UI's bundle is large; 2 busy cores parse it slowly

try:
    from selenium import webdriver
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
except ImportError:
    missing = ["selenium (pip install -e '.[test]')"]
if missing:
    # CI installs them (.ci/run), so there a missing one is a failure, not a skip
    (pytest.fail if os.environ.get("CI") else pytest.skip)(
        f"needs {', '.join(missing)}; apt-get install chromium chromium-driver",
        **({"pytrace": False} if os.environ.get("CI") else {"allow_module_level": True}))


@pytest.fixture(scope="module")
def logged_search(tmp_path_factory):
    """A tiny real search (2 trials, 2 epochs) logged to a real tracking server."""
    folder = tmp_path_factory.mktemp("ui")
    server = MlflowServer(folder)
    server.start()
    space = {
        "name": "ui-search", "dataset": "ml-100k",
        "embedding": {"encoder": "random", "dim": 16},
        "search": {"metric": "val/overall/ndcg_20", "mode": "max", "num_samples": 2,
                   "max_concurrent": 2, "seed": 0, "max_epochs": 2, "max_failures": 0,
                   "scheduler": {"type": "none"}, "resources": {"cpu": 1, "gpu": 0},
                   "storage_path": str(folder / "results"), "tracking_uri": server.url},
        "fixed": {"method": "faerec", "backbone": "sasrec", "hidden_size": 8, "max_len": 20,
                  "proj_hidden": 16},
        "params": {"lambda": {"type": "loguniform", "low": 0.001, "high": 0.1}},
        "references": False, "confirm": False,  # the search stage alone
    }
    path = folder / "ui.yaml"
    path.write_text(yaml.safe_dump(space))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "local"}
    try:
        done = subprocess.run([sys.executable, "run_search.py", "--space", str(path)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=480)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name("ui-search").experiment_id
        runs = client.search_runs([experiment])
        trials = [r for r in runs if r.data.tags.get("faerec.role") == "trial"]
        assert len(trials) == 2
        yield server, experiment, trials
    finally:
        server.stop()


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1600,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    # both paths given: Selenium Manager (which would download a driver) never runs
    driver = webdriver.Chrome(options=options,
                              service=Service(executable_path=CHROMEDRIVER,
                                              log_output=str(tmp_path / "chromedriver.log")))
    driver.set_page_load_timeout(RENDER_TIMEOUT_S)
    yield driver
    driver.quit()
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def page_text(driver) -> str:
    return driver.execute_script("return document.body ? document.body.innerText : ''")


def wait_for_text(driver, texts: list[str], screenshot: Path, act=None) -> str:
    """Wait until every one of `texts` is on the page, calling `act(driver)` between looks
    (to expand rows, scroll a list); save a screenshot either way."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(d) -> bool:
        if all(t in page_text(d) for t in texts):
            return True
        if act is not None:
            act(d)
        return False
    try:
        WebDriverWait(driver, RENDER_TIMEOUT_S, poll_frequency=0.5).until(shown)
    except TimeoutException:
        pass
    finally:
        driver.save_screenshot(str(screenshot))
    text = page_text(driver)
    missing = [t for t in texts if t not in text]
    assert not missing, f"{missing} not on {driver.current_url} (see {screenshot}):\n{text[:2000]}"
    return text


def expand_parent_runs(driver) -> None:
    """Click the expander of collapsed parent runs (trials are nested under the search)."""
    for button in driver.find_elements(
            "css selector", "button[data-component-id*='runnamecellrenderer']"):
        if button.get_attribute("aria-expanded") != "true":
            button.click()


# The compare view lists metrics alphabetically in a virtualised table (a few rows are in
# the DOM at a time): scroll every scrollable box a step, until the metric is rendered.
SCROLL_STEP = """
let moved = false;
for (const e of document.querySelectorAll('*')) {
  const style = getComputedStyle(e);
  if (e.scrollHeight > e.clientHeight + 5 && /auto|scroll/.test(style.overflowY)) {
    const before = e.scrollTop;
    e.scrollTop += Math.max(e.clientHeight * 0.8, 100);
    moved = moved || e.scrollTop !== before;
  }
}
return moved;
"""


def show_text(text: str):
    def act(driver) -> None:
        found = driver.find_elements("xpath", f"//*[text()='{text}']")
        if found:
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", found[0])
        else:
            driver.execute_script(SCROLL_STEP)
    return act


def in_sight(driver, text: str) -> bool:
    """Scroll the element showing `text` to the middle of the window; True once it is
    displayed there (a virtualised table renders the row only after the scroll)."""
    for _ in range(5):
        show_text(text)(driver)
        time.sleep(0.5)
        if any(e.is_displayed() for e in driver.find_elements("xpath", f"//*[text()='{text}']")):
            return True
    return False


def close_assistant(driver) -> None:
    """The 'MLflow Assistant' side panel takes a third of the window."""
    for button in driver.find_elements("css selector", "button[aria-label='Close']"):
        if button.is_displayed():
            button.click()
            return


def test_experiment_page_and_compare_view_show_the_trials(logged_search, browser, tmp_path):
    server, experiment, trials = logged_search
    names = sorted(r.info.run_name for r in trials)

    # workflowType: MLflow 3.17's UI opens experiments in its GenAI view by default, which
    # shows traces, not runs
    browser.get(f"{server.url}/#/experiments/{experiment}?workflowType=machine_learning")
    wait_for_text(browser, ["ui-search", *names], tmp_path / "experiment.png",
                  act=expand_parent_runs)
    close_assistant(browser)
    browser.save_screenshot(str(tmp_path / "experiment.png"))

    query = urllib.parse.urlencode({"runs": json.dumps([r.info.run_id for r in trials]),
                                    "experiments": json.dumps([experiment])})
    browser.get(f"{server.url}/#/compare-runs?{query}")
    wait_for_text(browser, names, tmp_path / "compare.png")
    close_assistant(browser)
    wait_for_text(browser, [*names, TAIL_METRIC], tmp_path / "compare-tail.png",
                  act=show_text(TAIL_METRIC))
    assert in_sight(browser, TAIL_METRIC)
    browser.save_screenshot(str(tmp_path / "compare-tail.png"))
    for shot in ("experiment.png", "compare.png", "compare-tail.png"):
        assert (tmp_path / shot).stat().st_size > 10_000  # a rendered page, not a blank one
