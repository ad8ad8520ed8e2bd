"""Dagster run/event storage in a real PostgreSQL server (dagster-postgres), the way a user runs it: a private
server on loopback, the documented deploy/postgres/dagster.yaml in a fresh DAGSTER_HOME (password and the other
connection settings from the environment), then `python -m pipelines.cli register` and `dagster asset materialize`
of one small partition through the CLI. The run, its events and the dynamic partition are then read back from
Postgres itself (psycopg2) and through the instance API, and the outputs from the data root."""

import glob
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipelines.automation import PARTITIONED_ASSETS

pytest.importorskip("dagster_postgres", reason="the `postgres` extra (dagster-postgres) is not installed")
pytest.importorskip("psycopg2", reason="psycopg2 (installed with dagster-postgres) is missing")

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "postgres" / "dagster.yaml"
KEY = "pg-batch"
ASSETS = PARTITIONED_ASSETS
PARTITIONED = ",".join(PARTITIONED_ASSETS)
# The multiprocess executor (one process per step, each with its own Postgres connections), its step processes
# forked from a server that imported the model libraries once (docs/production.md) rather than each importing them.
MULTIPROCESS = {"execution": {"config": {"multiprocess": {"start_method": {"forkserver": {"preload_modules": [
    "pipelines.definitions", "torch", "diffusers", "transformers", "open_clip"]}}}}}}


def _postgres_bindir() -> Path | None:
    """The folder of initdb/pg_ctl/postgres: from PATH (symlinks resolved) or Debian's /usr/lib/postgresql/*/bin."""
    candidates = []
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).resolve().parent)
    versions = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    versions.sort(key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0, reverse=True)
    candidates += [Path(p).parent for p in versions]
    for bindir in candidates:
        if all((bindir / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    """A throwaway PostgreSQL cluster in a temporary folder. PostgreSQL refuses to run as root, so as root every
    server command runs as an unprivileged user (``postgres`` when it exists, else ``nobody``) owning the folder."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.password = secrets.token_hex(12)
        self.port = 0
        # Not under pytest's tmp_path: its parents are 0700 root-owned, which the server's user cannot enter.
        self.root = Path(tempfile.mkdtemp(prefix="prefmill-pg-"))
        self.data = self.root / "data"
        self.user = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    self.user = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            if self.user is None:
                pytest.skip("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")
        pw_file = self.root / "pw"
        pw_file.write_text(self.password + "\n")
        if self.user is not None:
            for path in (self.root, pw_file):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def _cmd(self, *args: str) -> list[str]:
        if self.user is None:
            return list(args)
        if shutil.which("runuser"):
            return ["runuser", "-u", self.user.pw_name, "--", *args]
        import shlex

        return ["su", "-s", "/bin/sh", self.user.pw_name, "-c", shlex.join(args)]

    def run(self, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        done = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            log = self.root / "server.log"
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n"
                               f"{log.read_text() if log.exists() else ''}")
        return done

    def start(self) -> None:
        # Local (socket) connections trust; TCP connections, the only kind Dagster makes here, need the password.
        self.run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                 "--auth-host=scram-sha-256", f"--pwfile={self.root / 'pw'}", "-E", "UTF8", "--no-locale",
                 "--no-sync")
        for attempt in range(3):
            self.port = _free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off")
            try:
                self.run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options,
                         "-l", str(self.root / "server.log"), "-w", "-t", "60", "start")
                return
            except RuntimeError:
                if attempt == 2:  # the port was taken between picking and binding, three times: give up
                    raise

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                                     "stop"), capture_output=True, timeout=60, cwd=self.root)
        shutil.rmtree(self.root, ignore_errors=True)

    def connect(self, db_name: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", password=self.password,
                                dbname=db_name)


@pytest.fixture(scope="module")
def postgres():
    """A private PostgreSQL server on 127.0.0.1 with an empty ``dagster`` database, stopped at teardown."""
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl, postgres) in PATH or /usr/lib/postgresql/*/bin; "
                    "`make system-deps` installs Debian's postgresql package")
    server = _Server(bindir)
    try:
        server.start()
        conn = server.connect()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE dagster")
        conn.close()
        yield server
    finally:
        server.stop()


def test_a_partition_materialized_through_the_cli_is_recorded_in_postgres(postgres, tmp_path, write_batch, t2i_rows,
                                                                            monkeypatch):
    home, data = tmp_path / "dagster_home", tmp_path / "data"
    home.mkdir()
    shutil.copy(CONFIG, home / "dagster.yaml")
    write_batch(data / "inbox", KEY, t2i_rows[:2])
    pg_env = {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(postgres.port),
              "DAGSTER_PG_USERNAME": "postgres", "DAGSTER_PG_PASSWORD": postgres.password, "DAGSTER_PG_DB": "dagster"}
    env = {**os.environ, **pg_env, "DAGSTER_HOME": str(home), "PREFMILL_DATA": str(data), "PREFMILL_PROFILE": "tiny"}
    env.pop("PREFMILL_INBOX", None)
    env.pop("PREFMILL_CORPORA", None)

    register = subprocess.run([sys.executable, "-m", "pipelines.cli", "register"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert register.returncode == 0, register.stderr[-3000:]
    assert register.stdout.split() == [KEY]
    started = time.time()
    run = subprocess.run([str(Path(sys.executable).parent / "dagster"), "asset", "materialize",
                          "-m", "pipelines.definitions", "--select", PARTITIONED, "--partition", KEY,
                          "--config-json", json.dumps(MULTIPROCESS)],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-5000:]
    print(f"dagster asset materialize: {time.time() - started:.1f}s")

    # Nothing went to the default SQLite storage under DAGSTER_HOME.
    assert not (home / "history").exists() and not (home / "schedules").exists()

    # Straight from Postgres: the run, its step and materialization events, the partition and the asset check.
    with postgres.connect("dagster") as conn, conn.cursor() as cur:
        cur.execute("SELECT run_id, status, partition FROM runs")
        runs = cur.fetchall()
        assert len(runs) == 1, runs
        run_id, status, partition = runs[0]
        assert (status, partition) == ("SUCCESS", KEY)
        cur.execute("SELECT asset_key, partition FROM event_logs "
                    "WHERE run_id = %s AND dagster_event_type = 'ASSET_MATERIALIZATION'", (run_id,))
        materialized = sorted(cur.fetchall())
        assert materialized == sorted((f'["{asset}"]', KEY) for asset in ASSETS)
        cur.execute("SELECT step_key FROM event_logs WHERE run_id = %s AND dagster_event_type = 'STEP_SUCCESS'",
                    (run_id,))
        assert sorted(r[0] for r in cur.fetchall()) == sorted(ASSETS)
        cur.execute("SELECT count(*) FROM event_logs WHERE run_id = %s", (run_id,))
        assert cur.fetchone()[0] > 20  # every log line and engine event of the run, not only the summary
        # the gpu pool of dagster.yaml (default_limit: 1) was enforced through Postgres: its slot row is there
        cur.execute("SELECT concurrency_key, count(*) FROM concurrency_slots GROUP BY concurrency_key")
        assert dict(cur.fetchall()).get("gpu") == 1
        cur.execute("SELECT partitions_def_name, partition FROM dynamic_partitions")
        assert cur.fetchall() == [("prompt_batches", KEY)]
        cur.execute("SELECT check_name, execution_status FROM asset_check_executions WHERE run_id = %s", (run_id,))
        assert ("labels_follow_contract", "SUCCEEDED") in cur.fetchall()
        # The multiprocess executor: every step ran in its own process, each writing here.
        cur.execute("SELECT step_key FROM event_logs WHERE run_id = %s AND dagster_event_type = 'STEP_WORKER_STARTED'",
                    (run_id,))
        assert sorted(r[0] for r in cur.fetchall()) == sorted(ASSETS)

    # The same through Dagster's instance API, loaded from that DAGSTER_HOME as any process would.
    import dagster as dg

    for name, value in pg_env.items():
        monkeypatch.setenv(name, value)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        record = instance.get_run_record_by_id(run_id)
        assert record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
        assert record.dagster_run.tags["dagster/partition"] == KEY
        assert instance.get_dynamic_partitions("prompt_batches") == [KEY]
        for asset in ASSETS:
            event = instance.get_latest_materialization_event(dg.AssetKey(asset))
            assert event is not None and event.run_id == run_id
            assert event.dagster_event.partition == KEY

    # And the outputs on disk under PREFMILL_DATA.
    import polars as pl

    from pipelines.paths import Layout

    layout = Layout(data)
    assert len(pl.read_parquet(layout.prompts(KEY))) == 2
    candidates = pl.read_parquet(layout.candidates(KEY))
    assert len(candidates) == 2 * 4  # seeds_per_prompt: 4 on the tiny profile
    assert sorted(p.name for p in (layout.asset_dir("candidate_images", KEY) / "shards").glob("*.tar"))
    assert len(pl.read_parquet(layout.labels(KEY))) == len(candidates)
    assert layout.pairs(KEY).exists()
