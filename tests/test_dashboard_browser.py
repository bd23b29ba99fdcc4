"""The operator's dashboard in a real headless Chromium, against a real server with a round in progress.

Debian's `chromium` and `chromium-driver` (installed by `make test`, see the Makefile's `browser`
step) driven by Selenium through an explicit chromedriver path, so Selenium Manager never
downloads a browser or a driver. The browser reaches nothing but 127.0.0.1.

What a person sees is asserted on the rendered page: without the token only the public view;
with it the round's progress bars, one dot per accepted update on the norms chart under the clip
line, the versions table with evaluations, and the worker's error. Hostile strings (evaluation
names an operator posted, an exception text carrying a folder name) must show as text: a script
that ran (`window.__pwned`), an element they injected, or a Content-Security-Policy violation
they triggered would each fail the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.fixtures_aggregator import ADMIN, make_server, status, weights_model  # noqa: F401
from tests.test_aggregator_public import break_the_worker, repair_the_worker, upload_updates

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HOSTILE_NAMES = ('<img src=x onerror="window.__pwned=1">', '"><svg onload="window.__pwned=2">',
                 '</text><script>window.__pwned=3</script>')
# A state folder name that becomes part of the worker's exception text (no "/" allowed in a name).
HOSTILE_FOLDER = 'state<img id=injected src=x onerror="window.__pwned=4">'
# Runs before any page script (not subject to the page's CSP): records what would betray an injection.
WATCH = """window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) => window.__violations.push(e.violatedDirective + " " + e.blockedURI));"""


def _missing() -> list[str]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[dev]')")
    return missing


@pytest.fixture
def browser(tmp_path):
    if missing := _missing():
        pytest.skip(f"needs {', '.join(missing)}: `make system-tools` installs Debian's chromium and chromium-driver "
                    "(as root), or apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1500",
                f"--user-data-dir={tmp_path / 'chromium-profile'}", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-domain-reliability", "--disable-client-side-phishing-detection",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")),
                              options=options)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH})
    yield driver
    driver.quit()


def _wait(driver, predicate, what: str, timeout: float = 20.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: predicate(d), message=what)


def _view(driver) -> str:
    return driver.execute_script("return document.body.dataset.view")


def _polls(driver) -> int:
    return int(driver.execute_script("return document.body.dataset.polls || 0"))


def _text(driver, css: str) -> str:
    return driver.find_element("css selector", css).text


def _rows(driver, table: str) -> list[list[str]]:
    """The table's cells as the page shows them, header row first."""
    return driver.execute_script(f"""return [...document.querySelectorAll("{table} tr")].map(
        (tr) => [...tr.children].map((c) => c.textContent))""")


def _assert_nothing_injected(driver):
    found = driver.execute_script("""return {pwned: window.__pwned ?? null, violations: window.__violations,
        imgs: document.querySelectorAll("img").length, injected: document.querySelectorAll("#injected").length,
        scripts: [...document.scripts].map((s) => s.getAttribute("src")),
        svgOutsideCharts: [...document.querySelectorAll("svg")].filter((s) => !["norms", "evals"].includes(s.id)).length}""")
    assert found == {"pwned": None, "violations": [], "imgs": 0, "injected": 0, "scripts": ["/static/dashboard.js"],
                     "svgOutsideCharts": 0}, found


def _submit_token(driver, token: str):
    box = driver.find_element("id", "token")
    box.clear()
    box.send_keys(token)
    driver.find_element("css selector", "#token-form button[type=submit]").click()


def test_dashboard_shows_a_round_in_progress_and_escapes_what_it_relays(browser, make_server, weights_model,
                                                                         tmp_path):
    srv = make_server(weights_model, state_dir=tmp_path / HOSTILE_FOLDER, goal_clients=4, min_clients=2)
    upload_updates(srv.url, 2)
    evals = {HOSTILE_NAMES[0]: 120.5, "top1": 0.125, HOSTILE_NAMES[1]: 2.5, HOSTILE_NAMES[2]: 3.25}
    assert requests.post(f"{srv.url}/v1/admin/evaluations", headers={"Authorization": f"Bearer {ADMIN}"},
                         json={"model_version": 1, "eval": evals}).status_code == 200
    error = break_the_worker(srv)  # the third update is accepted, then folding fails
    assert HOSTILE_FOLDER in error

    # Anyone: the version, the open round's timing, the version history; nothing else.
    browser.get(f"{srv.url}/")
    _wait(browser, lambda d: _view(d) == "public", "the public view")
    assert _text(browser, "#version") == "model v1"
    round_text = _text(browser, "#round")
    assert "Round 1 (open) trains v1; deadline in" in round_text and "need the operator token" in round_text
    assert not browser.find_element("id", "detail").is_displayed()
    assert browser.find_elements("css selector", "progress") == []
    header, row = _rows(browser, "#versions")
    assert header == ["version", "parent", "round", "created (UTC)"] and row[:3] == ["1", "", ""]
    page = browser.find_element("tag name", "body").text
    assert HOSTILE_FOLDER not in page and "worker error" not in page and "top1" not in page
    browser.save_screenshot(str(tmp_path / "dashboard-public.png"))

    _submit_token(browser, "not-the-token")
    _wait(browser, lambda d: "refused" in _text(d, "#token-note"), "the refused-token note")
    assert _view(browser) == "public"

    # The operator: progress, norms, rejections, evaluations, the worker's error.
    _submit_token(browser, ADMIN)
    _wait(browser, lambda d: _view(d) == "operator", "the operator view")
    _assert_nothing_injected(browser)
    assert "token" not in browser.current_url and ADMIN not in browser.current_url
    accepted = browser.find_element("id", "accepted")
    assert (accepted.get_attribute("value"), accepted.get_attribute("max")) == ("3", "4")
    assert "accepted 3 / goal 4 (min 2)" in _text(browser, "#round")
    assigned = browser.find_element("id", "assigned")
    assert (assigned.get_attribute("value"), assigned.get_attribute("max")) == ("3", str(status(srv.url)["round"][
        "max_assigned"]))
    assert _text(browser, "#rejected") == "rejected: none"

    norms = status(srv.url)["update_norms"]
    dots = browser.find_elements("css selector", "#norms circle")
    assert len(dots) == len(norms["norms"]) == 3
    clip_y = float(browser.find_element("css selector", "#norms line.clip").get_attribute("y1"))
    ys = [float(d.get_attribute("cy")) for d in dots]
    assert all(y > clip_y for y in ys) == all(n < norms["clip_norm"] for n in norms["norms"])  # below the clip line
    # A larger norm is drawn higher (smaller y), in upload order.
    assert sorted(range(3), key=lambda i: ys[i]) == sorted(range(3), key=lambda i: -norms["norms"][i])
    assert browser.find_element("css selector", "#norms text.legend").text == "round 1"

    legends = [t.get_attribute("textContent") for t in browser.find_elements("css selector", "#evals text.legend")]
    assert sorted(legends) == sorted(evals)  # the hostile names, as text
    header, row = _rows(browser, "#versions")
    assert header == ["version", "parent", "round", "created (UTC)", "clients", "examples", "eval"]
    shown = [f"{k}={v}" for k, v in evals.items()]
    assert all(item in row[-1] for item in shown) and len(row[-1]) == len(" ".join(shown))
    assert _text(browser, "#worker-error") == f"worker error: {error}"
    assert _rows(browser, "#rounds")[1][:4] == ["1", "open", "1", "3/4"]
    _assert_nothing_injected(browser)
    browser.save_screenshot(str(tmp_path / "dashboard-operator.png"))

    # The page keeps polling: the worker recovers and a new evaluation shows, without a reload.
    polls = _polls(browser)
    repair_the_worker(srv)
    assert requests.post(f"{srv.url}/v1/admin/evaluations", headers={"Authorization": f"Bearer {ADMIN}"},
                         json={"model_version": 1, "eval": {"top3": 0.25}}).status_code == 200
    _wait(browser, lambda d: "top3=0.25" in _text(d, "#versions"), "the next poll to show the new evaluation")
    assert _polls(browser) > polls and browser.find_elements("id", "worker-error") == []

    # The token lives in this tab's sessionStorage: a reload keeps the operator view; "Forget" drops it.
    browser.refresh()
    _wait(browser, lambda d: _view(d) == "operator", "the operator view after a reload")
    browser.find_element("id", "forget").click()
    _wait(browser, lambda d: _view(d) == "public", "the public view after forgetting the token")
    assert browser.execute_script("return sessionStorage.length") == 0
    _assert_nothing_injected(browser)



def test_dashboard_states_the_privacy_spent_its_assumption_and_the_spent_budget(browser, make_server, weights_model):
    """DP on, a target ε with room for one round: after it the page says what was spent and why no round opens."""
    from tests.test_privacy_budget_http import GOAL, N, Z, _dp, _epsilon, _run_round

    srv = make_server(weights_model, **_dp(dp_target_epsilon=(_epsilon(1) + _epsilon(2)) / 2))
    _run_round(srv.url, 1)
    spent = status(srv.url)["privacy"]["spent"]
    browser.get(f"{srv.url}/")
    _wait(browser, lambda d: d.find_elements("id", "privacy-budget"), "the privacy line")
    line = _text(browser, "#privacy-epsilon")
    assert f"ε = {round(spent['epsilon'], 4):g}" in line and "after 1 round " in line and f"noise multiplier {Z:g}" in line
    assert f"without amplification ε = {round(spent['epsilon_without_amplification'], 4):g}" in line
    assert "clip" not in line  # the public view has no clip norm
    assert f"q = {GOAL}/{N}" in _text(browser, "#privacy-assumption")
    budget = browser.find_element("id", "privacy-budget")
    assert "privacy budget spent" in budget.text and budget.get_attribute("class") == "bad"
    assert "No active round." in _text(browser, "#round")
    _submit_token(browser, ADMIN)
    _wait(browser, lambda d: _view(d) == "operator", "the operator view")
    _wait(browser, lambda d: "clip 1" in _text(d, "#privacy-epsilon"), "the operator's privacy line")
    _assert_nothing_injected(browser)
