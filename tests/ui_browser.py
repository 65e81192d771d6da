"""The Prefect UI driven by a headless Chromium (Debian's /usr/bin/chromium through Playwright's
Python API; no browser download): a deployment's Custom run form, a paused run's Resume
(approval) form, a finished run's artifacts. Used by tests/test_ui.py and docs/take_screenshots.py.

Selectors are the classic UI's (the pages under /runs and /deployments) and are found by role
and visible text; the notes say where the UI needs a workaround. The server must be started with
PREFECT_UI_API_URL pointing at itself, or the UI calls http://127.0.0.1:4200/api.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from playwright.sync_api import Locator, Page, Response, expect, sync_playwright

from tests.processes import running_until_ready

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# headless is Playwright's own flag; these keep Chromium off the network (no internet here).
# Playwright gives every launch a fresh temporary --user-data-dir by itself.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 1000}
TIMEOUT_MS = 30_000
SERVER_BUSY = 503


def _again_while_busy(submit: Callable[[], Response]) -> Response:
    """Prefect on SQLite answers 503 when a write finds the database locked (a loaded machine);
    nothing was changed, and a person submits the form again: so do the tests, twice at most."""
    for _ in range(2):
        response = submit()
        if response.status != SERVER_BUSY:
            return response
    return submit()


@contextlib.contextmanager
def ui_page(dark: bool = False, viewport: dict[str, int] | None = None) -> Iterator[Page]:
    """A fresh headless Chromium page. The Prefect UI keeps its theme in localStorage
    ('color-scheme', JSON-encoded) and defaults to dark, whatever prefers-color-scheme says;
    set it before the app boots."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            ctx = browser.new_context(viewport=viewport or VIEWPORT, color_scheme="dark" if dark else "light")
            ctx.add_init_script(
                f"localStorage.setItem('color-scheme', {json.dumps(json.dumps('dark' if dark else 'light'))})"
            )
            # the V1 UI is served at /; the bare / redirects to the React V2 UI (/v2) unless this
            # cookie says otherwise. Deep links (/runs/..., /deployments/...) stay on V1 anyway.
            ctx.set_default_timeout(TIMEOUT_MS)
            # the V2 (React) UI calls Amplitude analytics (*.amplitude.com) whatever
            # PREFECT_SERVER_ANALYTICS_ENABLED says; there is no internet, so fail it at once
            ctx.route(re.compile(r"^https?://[^/]*amplitude\.com/"), lambda route: route.abort())
            page = ctx.new_page()
            yield page
        finally:
            browser.close()


def _goto(page: Page, url: str, ready: Any) -> None:
    """Load a page of the single-page app and wait until `ready` (a locator) is visible: the
    Vue app fetches its data after the first paint, so networkidle alone can race it."""
    page.goto(url, wait_until="networkidle")
    expect(ready).to_be_visible()


def _settle(page: Page) -> None:
    """After a client-side route or tab change: let its API calls finish and animations end."""
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(300)  # modal / tab transition (~150-200 ms)


def tall_screenshot(page: Page, path: Path, max_height: int = 6000) -> None:
    """full_page=True captures only the viewport here (the app scrolls an inner container, not the
    body), so grow the viewport to the tallest scrolling element instead (twice: a taller window
    can re-flow the page)."""
    old = page.viewport_size
    height = old["height"]
    for _ in range(3):
        tallest = page.evaluate("() => Math.max(...[...document.querySelectorAll('*')].map(e => e.scrollHeight))")
        wanted = min(int(tallest) + 40, max_height)
        if wanted <= height:
            break
        height = wanted
        page.set_viewport_size({"width": old["width"], "height": height})
        page.wait_for_timeout(300)
    page.screenshot(path=str(path))
    page.set_viewport_size(old)


# ---- (a) a deployment and its Run > Custom run form -------------------------------------------


def shoot_deployment(page: Page, base: str, deployment_id: str, out: Path) -> None:
    _goto(page, f"{base}/deployments/deployment/{deployment_id}", page.get_by_role("button", name="Run", exact=True))
    page.screenshot(path=str(out / "deployment.png"))
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.get_by_role("link", name="Custom run")).to_be_visible()
    page.wait_for_timeout(250)  # the menu fades in
    page.screenshot(path=str(out / "deployment-run-menu.png"))
    page.get_by_role("link", name="Custom run").click()
    page.wait_for_url(re.compile(r"/deployments/deployment/[^/]+/run"))
    expect(page.get_by_role("heading", name="Parameters")).to_be_visible()
    _settle(page)
    page.screenshot(path=str(out / "custom-run-form.png"))
    tall_screenshot(page, out / "custom-run-form-full.png")
    use_json_input(page)
    page.screenshot(path=str(out / "custom-run-json.png"))


def use_json_input(page: Page) -> None:
    """The ⋮ button beside the 'Parameters' heading opens a menu with one entry, 'Use JSON input'
    (and 'Use form input' back). The JSON editor is a plain <textarea> under a highlighted view."""
    page.get_by_role("heading", name="Parameters").locator("xpath=..").get_by_role("button").click()
    page.get_by_text("Use JSON input", exact=True).click()
    expect(page.locator("textarea.p-code-input__textarea")).to_be_visible()
    page.wait_for_timeout(200)


def start_custom_run_in_browser(
    page: Page, base: str, deployment_id: str, parameters: dict[str, Any], out: Path | None = None
) -> str:
    """Fill the Custom run form in JSON mode and submit; returns the new flow run's id (from the
    create_flow_run response)."""

    def submit() -> Response:
        _goto(
            page, f"{base}/deployments/deployment/{deployment_id}/run", page.get_by_role("heading", name="Parameters")
        )
        _settle(page)
        use_json_input(page)
        page.locator("textarea.p-code-input__textarea").fill(json.dumps(parameters, indent=2))
        with page.expect_response(lambda r: "/create_flow_run" in r.url and r.request.method == "POST") as created:
            page.get_by_role("button", name="Submit", exact=True).click()
        return created.value

    response = _again_while_busy(submit)
    if not response.ok:
        raise RuntimeError(f"create_flow_run answered {response.status}: {response.text()[:500]}")
    flow_run_id = response.json()["id"]
    # the UI goes back to the deployment page (?tab=Runs) and toasts "<run name> scheduled to start
    # now" with a 'View run' button (the name is the form's random Run Name until the flow renames it)
    toast = page.get_by_text("scheduled to start").first  # every toast is rendered twice (two toast containers)
    expect(toast).to_be_visible()
    page.wait_for_timeout(300)
    if out is not None:
        page.screenshot(path=str(out / "custom-run-submitted.png"))
    # its 'View run' button is not reliably clickable: the second, identical toast container lies on
    # top and intercepts the pointer; go to the run's page directly instead
    # (a Scheduled run's page has only the Logs, Details, Parameters and Job Variables tabs)
    _goto(page, f"{base}/runs/flow-run/{flow_run_id}", page.get_by_role("tablist"))
    return flow_run_id


# ---- (b) a paused run and its Resume form -----------------------------------------------------


def resume_dialog(page: Page) -> Locator:
    return page.get_by_role("dialog").filter(has_text="Resume Flow Run")


def open_resume_form(page: Page, base: str, flow_run_id: str) -> Any:
    """The paused run's page has 'Resume' and 'Cancel' buttons top right. 'Resume' opens a modal
    (role=dialog, with no accessible name: its aria-labelledby points at nothing) titled
    'Resume Flow Run': the pause's description as markdown, then one field per RunInput field."""
    _goto(page, f"{base}/runs/flow-run/{flow_run_id}", page.get_by_role("button", name="Resume", exact=True))
    page.get_by_role("button", name="Resume", exact=True).click()
    dialog = resume_dialog(page)
    expect(dialog).to_be_visible()
    expect(dialog.get_by_role("button", name="Submit", exact=True)).to_be_visible()
    page.wait_for_timeout(300)  # modal fade-in
    return dialog


def _field(dialog: Any, label: str) -> Any:
    """A form field's block, found by its label text (the <label for=...> ids match no input, so
    get_by_label does not work on this form). .last: a nested object's block (e.g. the deployment
    form's 'spec') contains its fields' blocks and matches too; the innermost comes last."""
    return (
        dialog.locator(".schema-form-property")
        .filter(has=dialog.page.get_by_text(re.compile(rf"^{re.escape(label)}( \(Optional\))?$")))
        .last
    )


def fill_approval(dialog: Any, approve: bool = True, reason: str | None = None, max_usd: float | None = None) -> None:
    """A bool is a toggle: <label role="switch" aria-checked="false|true"> over a hidden checkbox;
    click the switch (not the checkbox). Optional fields say '(Optional)' after the title."""
    switch = _field(dialog, "Approve this spend").get_by_role("switch")
    if (switch.get_attribute("aria-checked") == "true") != approve:
        switch.click()
    expect(switch).to_have_attribute("aria-checked", "true" if approve else "false")
    if reason is not None:
        _field(dialog, "Reason").get_by_role("textbox").fill(reason)
    if max_usd is not None:
        _field(dialog, "Spending cap (USD)").get_by_role("spinbutton").fill(str(max_usd))


def approve_in_browser(
    base_url: str,
    flow_run_id: str,
    approve: bool = True,
    reason: str | None = "approved in the browser",
    max_usd: float | None = None,
    page: Page | None = None,
    shots: Path | None = None,
) -> dict[str, Any]:
    """Open the paused run, click Resume, set 'Approve this spend', submit. Returns the JSON body
    the UI POSTed to /api/flow_runs/<id>/resume (its run_input). Raises when the server refuses."""
    if page is None:
        with ui_page() as fresh:
            return approve_in_browser(base_url, flow_run_id, approve, reason, max_usd, fresh, shots)
    response = _again_while_busy(
        lambda: _submit_resume_form(page, base_url, flow_run_id, approve, reason, max_usd, shots)
    )
    body = response.request.post_data_json
    if not response.ok:
        raise RuntimeError(f"resume answered {response.status}: {response.text()[:500]}")
    answer = response.json()
    if answer.get("status") not in ("ACCEPT", None):
        raise RuntimeError(f"resume was not accepted: {answer}")
    expect(resume_dialog(page)).to_be_hidden()
    # both UIs confirm with a toast (V1 renders each toast twice, hence .first); V1 then swaps
    # its 'Resume' button for 'Suspend'
    expect(page.get_by_text("Flow run resumed").first).to_be_visible()
    if shots:
        _settle(page)
        page.screenshot(path=str(shots / "resumed.png"))
    return body


def _submit_resume_form(
    page: Page,
    base_url: str,
    flow_run_id: str,
    approve: bool,
    reason: str | None,
    max_usd: float | None,
    shots: Path | None,
) -> Response:
    dialog = open_resume_form(page, base_url, flow_run_id)
    if shots:
        page.screenshot(path=str(shots / "resume-form.png"))
    fill_approval(dialog, approve, reason, max_usd)
    if shots:
        page.screenshot(path=str(shots / "resume-form-filled.png"))
    with page.expect_response(
        lambda r: r.url.endswith(f"/flow_runs/{flow_run_id}/resume") and r.request.method == "POST"
    ) as resumed:
        dialog.get_by_role("button", name="Submit", exact=True).click()
    return resumed.value


# ---- (c) a finished run's Artifacts tab ------------------------------------------------------


def shoot_artifacts(page: Page, base: str, flow_run_id: str, out: Path) -> None:
    """?tab=Artifacts in the URL is not honoured on a fresh load (the page rewrites it to
    ?tab=Logs), so click the tab: an <li class="p-tab" id="artifacts"> with the text 'Artifacts'."""
    _goto(page, f"{base}/runs/flow-run/{flow_run_id}", page.get_by_text("Artifacts", exact=True))
    page.wait_for_timeout(500)  # the timeline graph is a canvas that draws after the data
    page.screenshot(path=str(out / "run-completed.png"))
    page.get_by_text("Artifacts", exact=True).click()
    page.wait_for_url(re.compile(r"tab=Artifacts"))
    _settle(page)
    heading = page.get_by_text("Flow run", exact=True)
    expect(heading).to_be_visible()
    heading.scroll_into_view_if_needed()
    page.screenshot(path=str(out / "run-artifacts.png"))
    tall_screenshot(page, out / "run-artifacts-full.png")
    # one page per artifact, by its id from the API: /artifacts/artifact/<id>. (A card click works too,
    # but going back lands on ?tab=Artifacts showing the Logs tab, see above.)
    latest = {}
    for a in artifacts_of(base, flow_run_id):  # newest first
        latest.setdefault(a["key"].split("-")[0], a)
    for kind in ("plan", "progress", "loss", "report"):
        if kind not in latest:
            continue
        _goto(
            page,
            f"{base}/artifacts/artifact/{latest[kind]['id']}",
            page.get_by_role("link", name=latest[kind]["key"]).first,
        )
        page.wait_for_timeout(300)
        tall_screenshot(page, out / f"artifact-{kind}.png", max_height=4000)


# ---- the API side ----------------------------------------------------------------------------


def flow_run_state(base: str, flow_run_id: str) -> str:
    with urllib.request.urlopen(f"{base}/api/flow_runs/{flow_run_id}", timeout=10) as r:
        return json.load(r)["state_type"]


def artifacts_of(base: str, flow_run_id: str) -> list[dict[str, Any]]:
    body = json.dumps({"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "CREATED_DESC"}).encode()
    req = urllib.request.Request(f"{base}/api/artifacts/filter", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def wait_for_state(base: str, flow_run_id: str, states: set[str], timeout_s: float = 600, poll_s: float = 1) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        state = flow_run_state(base, flow_run_id)
        if state in states or time.monotonic() > deadline:
            return state
        time.sleep(poll_s)


# ---- a server with its UI, the deployments served, and the walk-through ------------------------


@contextlib.contextmanager
def server_with_ui(home: Path, port: int, log: Path) -> Iterator[str]:
    """`prefect server start` with the UI told where its API is; yields the base URL."""
    import sys

    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_UI_API_URL": f"{base}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    args = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with running_until_ready(args, env, log, f"{base}/api/health", "the Prefect server", 90):
        yield base


@contextlib.contextmanager
def deployments_served(base: str, env: dict[str, str], log: Path) -> Iterator[None]:
    """`python -m deployments.serve` against that server, until its sft deployment exists."""
    import sys

    with running_until_ready(
        [sys.executable, "-m", "deployments.serve"],
        {**env, "PREFECT_API_URL": f"{base}/api"},
        log,
        f"{base}/api/deployments/name/sft/sft",
        "deployments.serve",
        120,
        cwd=Path(__file__).resolve().parent.parent,
    ):
        yield


def walkthrough(base: str, spec: dict[str, Any], out: Path, reason: str, to_the_end: bool = True) -> dict[str, Any]:
    """What docs/ways-in.md walks a person through: the deployment's form, a run started from it, the
    paused run's approval form answered, the finished run's artifacts; screenshots of each.
    Without `to_the_end` it stops once the approved run is training again (the test's way)."""
    deployment_id = _api_json(f"{base}/api/deployments/name/sft/sft")["id"]
    with ui_page() as page:
        if to_the_end:
            shoot_deployment(page, base, deployment_id, out)
        flow_run_id = start_custom_run_in_browser(page, base, deployment_id, {"spec": spec}, out)
        paused = wait_for_state(base, flow_run_id, {"PAUSED", "FAILED", "CRASHED", "COMPLETED"}, 300)
        if paused != "PAUSED":
            raise AssertionError(f"the run did not pause for approval: it is {paused}")
        sent = approve_in_browser(base, flow_run_id, reason=reason, page=page, shots=out)
        if not to_the_end:
            state = wait_for_state(base, flow_run_id, {"RUNNING", "COMPLETED", "FAILED", "CRASHED"}, 60)
            return {"flow_run_id": flow_run_id, "sent": sent, "state": state}
        final = wait_for_state(base, flow_run_id, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, 600)
        if final == "COMPLETED":
            shoot_artifacts(page, base, flow_run_id, out)
    return {"flow_run_id": flow_run_id, "sent": sent, "state": final}


def _api_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)
