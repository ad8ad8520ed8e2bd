"""Issue 6: a real browser against ``dagster dev``. Debian's headless Chromium, driven by Playwright, opens the
Dagster UI served on 127.0.0.1, sees every asset in the lineage graph and the catalog, launches a materialization
of one prompt-batch partition from the job's launch dialog and watches the run reach Success.

The UI is only driven through what a person would click; the GraphQL endpoint is read only to explain a failure.
Screenshots land in the test's tmp_path (their paths are in the assertion messages)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ASSETS = [
    "prompt_batches", "candidate_images", "reward_labels", "preference_pairs",
    "sft_corpus", "preference_corpus", "rl_prompt_pool",
    "sft_run", "dpo_run", "grpo_run", "sft_eval", "dpo_eval", "grpo_eval", "ar_grpo_run",
    "grpo_base_run", "dpo_shuffled_run", "grpo_verifier_run", "proving_report", "subject_run",
]
PARTITIONED = ["prompt_batches", "candidate_images", "reward_labels", "preference_pairs"]
JOB = "label_batch_job"
RUN_TIMEOUT_S = 300  # 2 prompts on the tiny profile: ~60-90 s on a shared 2-core box, start-up included
UI_TIMEOUT_MS = 60_000
TERMINAL = ("SUCCESS", "FAILURE", "CANCELED")


def _shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    try:
        page.screenshot(path=str(path), full_page=True)
    except Exception as exc:  # noqa: BLE001 - a screenshot must never hide the real failure
        return Path(f"(screenshot failed: {exc})")
    return path


def _missing(locators: dict, first_timeout_ms: int) -> list[str]:
    """Names whose locator is not visible: waits for the first one, then checks the rest (same render)."""
    missing = []
    for i, (name, loc) in enumerate(locators.items()):
        try:
            loc.wait_for(state="visible", timeout=first_timeout_ms if i == 0 else 5_000)
        except Exception:  # noqa: BLE001 - playwright TimeoutError
            missing.append(name)
    return missing


def test_lineage_graph_shows_every_asset(ui_page, tmp_path):
    from pipelines.definitions import ALL_ASSETS

    assert sorted(ASSETS) == sorted(a.key.to_user_string() for a in ALL_ASSETS), "ASSETS is out of date"
    page = ui_page
    page.goto("/asset-groups")  # "Lineage" in the navigation: the global asset graph
    page.get_by_text("Global asset lineage", exact=True).wait_for(timeout=UI_TIMEOUT_MS)
    # Asset nodes are HTML inside the graph's SVG (foreignObject); the sidebar tree is outside any SVG.
    nodes = {name: page.locator("svg").get_by_text(name, exact=True).first for name in ASSETS}
    # The graph starts with its groups collapsed; the graph settings menu expands them all.
    for _ in range(3):  # a menu closed by something popping up (a dialog, a re-render) is opened again
        page.get_by_role("button", name="settings", exact=True).click()
        try:
            page.get_by_role("menuitem", name="Expand all groups").click(timeout=15_000)
        except Exception:  # noqa: BLE001 - playwright TimeoutError
            page.keyboard.press("Escape")
            continue
        page.keyboard.press("Escape")
        break
    missing = _missing(nodes, UI_TIMEOUT_MS)
    shot = _shot(page, tmp_path, "lineage")
    assert not missing, f"asset nodes not shown in the lineage graph: {missing}; screenshot {shot}"


def test_catalog_lists_every_asset(ui_page, tmp_path):
    page = ui_page
    page.goto("/assets")  # "Catalog" in the navigation
    links = {name: page.locator(f'a[href="/assets/{name}"]').filter(has_text=name).first for name in ASSETS}
    missing = _missing(links, UI_TIMEOUT_MS)
    shot = _shot(page, tmp_path, "catalog")
    assert not missing, f"assets not linked in the catalog: {missing}; screenshot {shot}"


def test_materialize_one_partition_from_the_ui(ui_page, dagster_ui, tmp_path):
    page = ui_page
    partition = dagster_ui.partition  # "ui-batch": the inbox's one batch file, registered before the daemon started
    # Jobs -> label_batch_job -> "Materialize all…" -> the launch dialog
    page.goto("/jobs")
    page.get_by_text(JOB, exact=True).click()
    page.wait_for_url(re.compile(rf"/jobs/{JOB}"))
    page.get_by_role("button", name=re.compile("Materialize all")).click()
    dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize")
    title = dialog.get_by_text(f"Launch runs to materialize {len(PARTITIONED)} assets", exact=True)
    title.wait_for(timeout=UI_TIMEOUT_MS)
    dialog.get_by_text("Select a partition or create one", exact=True).click()
    page.get_by_role("menuitem", name=partition).click()
    title.click()  # closes the partition picker, keeps the dialog
    dialog.get_by_text("1 partition", exact=True).wait_for()
    _shot(page, tmp_path, "launch_dialog")
    launch = dialog.get_by_role("button", name="Launch 1 run", exact=True)
    launch.click()

    # The launch toast: "Launched run <id>" with a "View" link to the run's page.
    toast = page.get_by_text(re.compile(r"^Launched run [0-9a-f]{8}$"))
    toast.wait_for(timeout=UI_TIMEOUT_MS)
    short_id = toast.inner_text().split()[-1]
    try:
        page.get_by_role("link", name="View", exact=True).filter(visible=True).first.click(timeout=15_000)
    except Exception:  # noqa: BLE001 - the toast went away first: the Runs list links the run as well
        page.goto("/runs")
        page.locator(f'a[href^="/runs/{short_id}"]').first.click()
    page.wait_for_url(re.compile(rf"/runs/{short_id}[0-9a-f-]+"))
    run_id = page.url.rstrip("/").rsplit("/", 1)[-1]
    page.get_by_text(f"partition: {partition}", exact=True).wait_for()

    status, waited = _wait_for_run_end(page, short_id, dagster_ui.proc)
    shot = _shot(page, tmp_path, "run")
    if status != "SUCCESS":
        pytest.fail(f"run {run_id} ended {status} after {waited:.0f} s (screenshot {shot})\n"
                    f"{_run_diagnostics(dagster_ui, run_id)}")
    # The status tag in the run page's header says it too, not just the document title.
    page.get_by_text("Success", exact=True).wait_for(timeout=UI_TIMEOUT_MS)
    print(f"\n[browser] run {short_id} of {JOB} for partition {partition}: SUCCESS after {waited:.0f} s in the UI")

    pairs = dagster_ui.data / "preference_pairs" / partition / "pairs.parquet"
    assert pairs.is_file(), f"the run succeeded but wrote no {pairs} (screenshot {shot})"


def _wait_for_run_end(page, short_id: str, server) -> tuple[str, float]:
    """Watches the run page until its status is terminal. The page's title carries the status
    ("Runs | label_batch_job | 1a2b3c4d [STARTED]") and follows it live, as does the status tag in the header;
    a reload now and then covers a dropped websocket."""
    start = time.monotonic()
    last_reload = start
    status = "UNKNOWN"
    header_tag = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$"))
    while time.monotonic() - start < RUN_TIMEOUT_S:
        if server.poll() is not None:
            return f"unknown: dagster dev exited with {server.returncode}", time.monotonic() - start
        match = re.search(rf"{short_id} \[([A-Z_]+)\]", page.title())
        status = match.group(1) if match else status
        if status not in TERMINAL and header_tag.count():
            status = header_tag.first.inner_text().strip().upper()
        if status in TERMINAL:
            break
        if time.monotonic() - last_reload > 60:
            page.reload()
            last_reload = time.monotonic()
        page.wait_for_timeout(2_000)
    else:
        status = f"still {status} after {RUN_TIMEOUT_S} s"
    return status, time.monotonic() - start


_RUN_LOGS = """query($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status } ... on PythonError { message } }
  logsForRun(runId: $runId, limit: 1000) { __typename
    ... on EventConnection { events { __typename
      ... on MessageEvent { message level stepKey }
      ... on ErrorEvent { error { message stack } } } }
    ... on PythonError { message } } }"""


def _run_diagnostics(ui, run_id: str) -> str:
    """The run's warnings and errors (GraphQL, read-only) and the tail of the dagster dev log."""
    try:
        data = ui.graphql(_RUN_LOGS, {"runId": run_id}, timeout=30)["data"]
        events = (data["logsForRun"] or {}).get("events") or []
        lines = [f"run status: {json.dumps(data['runOrError'])}"]
        for e in events:
            if e.get("level") in ("ERROR", "CRITICAL", "WARNING") or e.get("error"):
                lines.append(f"[{e.get('level')}] {e.get('stepKey') or ''} {e.get('message', '')}")
                if e.get("error"):
                    lines.append(e["error"]["message"] + "".join(e["error"].get("stack") or [])[-3000:])
        logs = "\n".join(lines)
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        logs = f"(GraphQL diagnostics failed: {type(exc).__name__}: {exc})"
    return f"{logs}\n--- dagster dev log (tail) ---\n{ui.log_tail()}"
