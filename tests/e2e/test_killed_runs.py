"""A `dagster asset materialize` killed with SIGKILL mid-partition — in ``candidate_images``, a ``gpu``-pool step —
is recovered by running the same command again, with no manual step, and ends with the outputs of a run that was
never interrupted.

The instance uses the repository's ``dagster.yaml`` (the ``gpu`` pool limited to one slot). SIGKILL goes to the
whole process group (the CLI run worker and its step process), as a preempted node or a container OOM kill does:
nothing gets to report or clean up, so the run stays STARTED with the pool slot claimed — before the fix the re-run
waited forever on "blocked by limit for pool gpu". The re-run's executor finds that run's processes gone, fails it
and frees the slot (``pipelines.recovery``), removes the stale shard temps, and resumes from the whole shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal

from pipelines.io import this_host
from pipelines.paths import REPO_ROOT, SAMPLES_DIR, Layout

pytestmark = pytest.mark.slow

KEY = "killed-batch"
SELECT = "prompt_batches,candidate_images"
PROMPTS = 2  # x 4 seeds = 8 candidates, one per shard: the kill lands between shards


def _t2i_rows(n: int) -> list[dict]:
    rows = []
    for path in sorted(SAMPLES_DIR.rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["task"] == "t2i" and row.get("split", "train") == "train":
                rows.append(row)
    return rows[:n]


def _contents(shard_dir: Path) -> dict[str, object]:
    """Each sidecar table's sha256, and each tar's samples: key and sha256 of every member (a tar's own bytes
    hold the time it was written)."""
    from pipelines.io import read_shard

    out: dict[str, object] = {}
    for path in sorted(shard_dir.iterdir()):
        if path.suffix == ".tar":
            out[path.name] = [(s["__key__"], {k: hashlib.sha256(v).hexdigest() for k, v in s.items()
                                              if not k.startswith("__")}) for s in read_shard(path)]
        else:
            out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("killed")
    rows = _t2i_rows(PROMPTS)
    profile = tmp / "profile.yaml"
    tiny = yaml.safe_load((REPO_ROOT / "pipelines" / "profiles" / "tiny.yaml").read_text())
    profile.write_text(yaml.safe_dump({"extends": "tiny", "generation": {**tiny["generation"], "shard_size": 1}}))
    for data in (tmp / "killed_data", tmp / "clean_data"):
        (data / "inbox").mkdir(parents=True)
        (data / "inbox" / f"{KEY}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    home = tmp / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())  # gpu pool: one slot
    env = {**os.environ, "DAGSTER_HOME": str(home), "PREFMILL_DATA": str(tmp / "killed_data"),
           "PREFMILL_PROFILE": str(profile)}
    for name in ("PREFMILL_INBOX", "PREFMILL_CORPORA", "PREFMILL_RECOVER_ON_START"):
        env.pop(name, None)
    register = subprocess.run([sys.executable, "-m", "pipelines.cli", "register"], env=env, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)
    assert register.returncode == 0 and register.stdout.split() == [KEY], register.stderr[-2000:]
    return tmp, home, env, profile


def test_a_killed_gpu_step_reruns_with_the_same_command_and_matches_an_uninterrupted_run(setup):
    tmp, home, env, profile = setup
    command = [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "pipelines.definitions",
               "--select", SELECT, "--partition", KEY]
    layout = Layout(tmp / "killed_data")
    shards = layout.asset_dir("candidate_images", KEY) / "shards"

    # 1. the run, killed while candidate_images (pool gpu) is between its shards
    started = time.time()
    with open(tmp / "killed.log", "w") as log:
        proc = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while not (shards / "000001.parquet").exists():
                assert proc.poll() is None, (tmp / "killed.log").read_text()[-3000:]
                assert time.time() - started < 180, "candidate_images never wrote two shards"
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    killed_s = time.time() - started
    whole = sorted(p.name for p in shards.glob("*.parquet"))
    assert 2 <= len(whole) < PROMPTS * 4, whole  # mid-partition
    assert not layout.candidates(KEY).exists()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (killed,) = instance.get_runs()
        assert killed.status == dg.DagsterRunStatus.STARTED  # nothing reported the kill
        claimed = instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
        assert [(s.run_id, s.step_key) for s in claimed] == [(killed.run_id, "candidate_images")]
    dead_writer = subprocess.Popen(["true"])
    dead_writer.wait()
    stale = shards / f".{len(whole):06d}.tar.tmp-{dead_writer.pid}@{this_host()}.k1ll3d.tmp"
    stale.write_bytes(b"half a shard")  # what a kill inside write_shard leaves

    # 2. the same command again: no manual step
    started = time.time()
    rerun = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    rerun_s = time.time() - started
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    output = rerun.stdout + rerun.stderr
    assert "recovery before this run: 1 dead run(s) failed" in output, output[-3000:]
    assert f"resuming: {len(whole)} candidates already in {len(whole)} shards" in output, output[-3000:]
    assert not stale.exists() and not [p for p in shards.parent.rglob(".*")], "stale temps left"
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = {r.run_id: r for r in instance.get_runs()}
        assert runs.pop(killed.run_id).status == dg.DagsterRunStatus.FAILURE
        assert [r.status for r in runs.values()] == [dg.DagsterRunStatus.SUCCESS]
        assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots == []

    # 3. an uninterrupted run into another data root (in this process, its own instance)
    from pipelines.definitions import ALL_ASSETS
    from pipelines.partitions import PROMPT_BATCH_PARTITIONS
    from pipelines.resources import default_resources

    started = time.time()
    clean = Layout(tmp / "clean_data")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(PROMPT_BATCH_PARTITIONS, [KEY])
    assets = [a for a in ALL_ASSETS if a.key.to_user_string() in SELECT.split(",")]
    result = dg.materialize(assets, partition_key=KEY, instance=instance,
                            resources=default_resources(str(clean.root), str(profile)))
    assert result.success
    clean_s = time.time() - started
    print(f"\nkilled after {killed_s:.1f}s, rerun {rerun_s:.1f}s, uninterrupted (in process) {clean_s:.1f}s")

    assert_frame_equal(pl.read_parquet(layout.candidates(KEY)), pl.read_parquet(clean.candidates(KEY)))
    assert len(pl.read_parquet(layout.candidates(KEY))) == PROMPTS * 4
    clean_shards = clean.asset_dir("candidate_images", KEY) / "shards"
    ours, theirs = _contents(shards), _contents(clean_shards)
    assert ours == theirs
    assert len(ours) == 2 * PROMPTS * 4  # a tar and a sidecar table per candidate
