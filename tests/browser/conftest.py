"""Fixtures of the browser tests: ``dagster dev`` on 127.0.0.1 (webserver + daemon) over a throw-away instance and
data root holding one tiny prompt batch, and Debian's headless Chromium driven by Playwright.

Nothing here downloads anything: Playwright runs its bundled driver against ``/usr/bin/chromium`` (never
``playwright install``), and the pipeline runs on the tiny offline profile (``.zoo/``, ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines.paths import REPO_ROOT, SAMPLES_DIR

CHROMIUM = Path(os.environ.get("PREFMILL_CHROMIUM", "/usr/bin/chromium"))
# On a closed network Chromium otherwise keeps retrying its background services (updates, sync, QUIC probes).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
PARTITION = "ui-batch"
STARTUP_TIMEOUT_S = 180  # `dagster dev` up and the code location loaded; ~20-40 s on a 2-core box
STOP_GRACE_S = 20  # SIGTERM to the process group, then SIGKILL


@dataclass
class DagsterUI:
    url: str
    home: Path
    data: Path
    inbox: Path
    log: Path
    proc: subprocess.Popen
    partition: str = PARTITION

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no dagster dev log: {exc})"

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 10.0) -> dict:
        """Diagnostics and readiness only: the tests drive the UI, never this endpoint."""
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())


def _require_browser() -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian package `chromium`; `make system-deps` installs it)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the Python package `playwright` is not installed (it is in the `dev` extra)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_batch(inbox: Path) -> Path:
    """Two text-to-image prompts from the bundled samples (t2i needs no input images) as one batch file."""
    rows = []
    for path in sorted((SAMPLES_DIR / "prompts").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["task"] == "t2i" and row.get("split", "train") == "train" and len(rows) < 2:
                rows.append(row)
    assert len(rows) == 2, "the bundled samples lost their t2i prompts"
    inbox.mkdir(parents=True, exist_ok=True)
    batch = inbox / f"{PARTITION}.jsonl"
    batch.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return batch


def _register_partition(home: Path) -> None:
    """Adds the partition before the daemon starts: the inbox sensor (on by default) then finds nothing new and
    leaves the launch to the test."""
    import dagster as dg

    from pipelines.partitions import PROMPT_BATCH_PARTITIONS

    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(PROMPT_BATCH_PARTITIONS, [PARTITION])


def _dagster_cli() -> str:
    local = Path(sys.executable).with_name("dagster")
    return str(local) if local.exists() else (shutil.which("dagster") or "dagster")


_LOCATIONS = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message } } } } ... on PythonError { message } } }"""


def _wait_until_ready(ui: DagsterUI, deadline: float) -> None:
    """``/server_info`` answers, then the code location has finished loading (a load error fails at once)."""
    last = "no answer yet"
    while time.monotonic() < deadline:
        if ui.proc.poll() is not None:
            pytest.fail(f"dagster dev exited with {ui.proc.returncode} before serving:\n{ui.log_tail()}")
        try:
            with urllib.request.urlopen(f"{ui.url}/server_info", timeout=5) as resp:
                resp.read()
            entries = ui.graphql(_LOCATIONS)["data"]["workspaceOrError"].get("locationEntries") or []
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                errors = [e for e in entries if e["locationOrLoadError"]["__typename"] == "PythonError"]
                if errors:
                    pytest.fail(f"the code location failed to load: {errors}\n{ui.log_tail()}")
                return
            last = f"locations: {entries}"
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(1.0)
    pytest.fail(f"dagster dev did not come up in {STARTUP_TIMEOUT_S} s ({last}):\n{ui.log_tail()}")


def _default_signals() -> None:
    """In the child before exec: a shell's background job inherits SIGINT ignored, and `dagster dev` maps SIGTERM
    to SIGINT's handler, so it would ignore SIGTERM too and never shut down gracefully."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the whole process group (webserver, daemon, code servers, run workers, step processes), then
    SIGKILL to whatever is left: `dagster dev` ignores further signals while it shuts down and can hang there."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and _group_alive(pgid, proc):
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _group_alive(pgid: int, proc: subprocess.Popen) -> bool:
    proc.poll()  # reaps the leader once it exits
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def chromium_browser():
    """Debian's Chromium, headless, through Playwright's bundled driver."""
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def dagster_ui(tmp_path_factory, chromium_browser) -> DagsterUI:
    """``dagster dev -m pipelines.definitions`` on a free loopback port over a temporary DAGSTER_HOME (the repo's
    dagster.yaml), data root and inbox with one registered two-prompt partition; the tiny offline profile."""
    tmp = tmp_path_factory.mktemp("dagster_ui")
    home, data = tmp / "dagster_home", tmp / "data"
    inbox = data / "inbox"
    home.mkdir()
    shutil.copyfile(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    _tiny_batch(inbox)
    _register_partition(home)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFMILL_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(home), PREFMILL_DATA=str(data), PREFMILL_INBOX=str(inbox), HF_HUB_OFFLINE="1",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONUNBUFFERED="1", PREFMILL_PROFILE="tiny")
    port = _free_port()
    log = tmp / "dagster_dev.log"
    cmd = [_dagster_cli(), "dev", "-m", "pipelines.definitions", "-d", str(REPO_ROOT), "-h", "127.0.0.1",
           "-p", str(port)]
    with open(log, "wb") as out:
        # cwd outside the repo so the repo's template dagster.yaml is not mistaken for the instance's
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_default_signals)
    ui = DagsterUI(url=f"http://127.0.0.1:{port}", home=home, data=data, inbox=inbox, log=log, proc=proc)
    try:
        started = time.monotonic()
        _wait_until_ready(ui, started + STARTUP_TIMEOUT_S)
        print(f"\n[browser] dagster dev ready at {ui.url} after {time.monotonic() - started:.1f} s; log {log}")
        yield ui
    finally:
        _stop(proc)


NUX = "Join the Dagster community"  # Dagster's one-time dialog, shown until someone dismisses it on this instance


@pytest.fixture
def ui_page(chromium_browser, dagster_ui, tmp_path):
    """A fresh browser context per test, with Dagster's one-time "Join the Dagster community" dialog out of the
    way: dismissed up front while the instance has not recorded it as seen (it pops up a moment after the first
    page renders, over whatever the test is clicking), and skipped again should it ever reappear."""
    context = chromium_browser.new_context(viewport={"width": 1600, "height": 1200}, base_url=dagster_ui.url)
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.set_default_navigation_timeout(90_000)
    nux_seen = dagster_ui.home / ".nux" / "nux.yaml"
    if not nux_seen.exists():
        page.goto("/")
        with contextlib.suppress(Exception):  # no dialog after all: the handler below still covers a late one
            page.get_by_role("dialog").filter(has_text=NUX).get_by_role("button", name="Skip", exact=True).click(
                timeout=30_000)
            deadline = time.monotonic() + 15
            while not nux_seen.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
    page.add_locator_handler(
        page.get_by_role("dialog").filter(has_text=NUX),
        lambda dialog: dialog.get_by_role("button", name="Skip", exact=True).click(),
    )
    try:
        yield page
    finally:
        with contextlib.suppress(Exception):
            page.screenshot(path=str(tmp_path / "last.png"), full_page=True)
        context.close()
