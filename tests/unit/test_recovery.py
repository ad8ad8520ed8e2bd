"""Killed runs (SIGKILL: no chance to clean up) do not block what comes after them:

- ``pipelines.recovery``: a run whose processes are gone is told from a live one (pids Dagster records in its
  events, a pid reused by a younger process counts as gone, zombies too), reported failed, and its ``gpu`` pool
  slot freed; live runs, runs of another host and runs on shared storage without a host tag are never touched;
  slots still held by runs that already ended are freed; ``corpus_refresh_sensor`` ignores dead runs and
  recovers them on its tick; ``python -m pipelines.cli recover``;
- stale temps: each stage removes what killed writers left in its folders, never a live process's temps;
- corpus manifests after a build killed between a segment record and the manifest say truthfully which
  partitions the version wrote and which it references, equal to a build that was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from pipelines.io import process_alive, remove_stale_temps, stale_temp_reason, this_host
from pipelines.recovery import ALIVE, DEAD, HOST_TAG, UNKNOWN, recover_dead_runs, run_liveness

REPO = Path(__file__).resolve().parents[2]
HOST = this_host()

# A run on the instance at $DAGSTER_HOME whose only step is in the gpu pool: it says it runs, then sleeps until
# killed (the in-process executor: the run worker and the step are this one process).
GPU_RUN = """
import sys, time
from pathlib import Path
import dagster as dg

ready = Path(sys.argv[1])

@dg.asset(pool="gpu")
def gpu_step(context):
    ready.write_text(context.run_id)
    time.sleep(600)

with dg.DagsterInstance.get() as instance:
    dg.materialize([gpu_step], instance=instance)
"""


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A DAGSTER_HOME with the repository's dagster.yaml (gpu pool limited to 1, run monitoring)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def _start_gpu_run(tmp_path: Path, name: str) -> tuple[subprocess.Popen, str]:
    ready = tmp_path / f"{name}.ready"
    script = tmp_path / "gpu_run.py"
    script.write_text(GPU_RUN)
    proc = subprocess.Popen([sys.executable, str(script), str(ready)], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ready.exists():
        assert proc.poll() is None, f"the {name} run exited early ({proc.returncode})"
        assert time.time() < deadline, f"the {name} run never reached its gpu step"
        time.sleep(0.05)
    return proc, ready.read_text()


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _gpu_holders(instance) -> set[str]:
    return {slot.run_id for slot in instance.event_log_storage.get_concurrency_info("gpu").claimed_slots}


# --------------------------------------------------------------------------------------------- liveness
def test_process_alive_knows_gone_zombie_and_reused_pids():
    assert process_alive(os.getpid())
    assert not process_alive(_dead_pid())
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert process_alive(child.pid, since=time.time())
        # the pid is alive, but the process started after the moment the asked-about process was known to run:
        # another process reused the pid
        assert not process_alive(child.pid, since=time.time() - 3600)
    finally:
        child.kill()
        child.wait()
    zombie = subprocess.Popen(["true"])
    deadline = time.time() + 10
    while Path(f"/proc/{zombie.pid}/stat").exists() and " Z " not in Path(f"/proc/{zombie.pid}/stat").read_text():
        assert time.time() < deadline
        time.sleep(0.01)
    assert not process_alive(zombie.pid)  # exited, not yet reaped
    zombie.wait()


def test_a_killed_run_is_failed_and_its_gpu_slot_freed_and_live_runs_are_left_alone(tmp_path, home):
    from pipelines.automation import _active_runs
    from pipelines.cli import main

    with dg.DagsterInstance.from_config(str(home)) as instance:
        proc, run_id = _start_gpu_run(tmp_path, "first")
        try:
            run = instance.get_run_by_id(run_id)
            alive = run_liveness(instance, run)
            assert alive.state == ALIVE and proc.pid in alive.pids and alive.host == HOST
            assert _active_runs(instance, run.job_name) == 1
            assert _gpu_holders(instance) == {run_id}
            untouched = recover_dead_runs(instance)
            assert not untouched.failed and not untouched.freed and [r.run_id for r in untouched.alive] == [run_id]
        finally:
            _kill(proc)

        run = instance.get_run_by_id(run_id)
        assert run.status == dg.DagsterRunStatus.STARTED and _gpu_holders(instance) == {run_id}  # what SIGKILL leaves
        assert run_liveness(instance, run).state == DEAD
        assert _active_runs(instance, run.job_name) == 0  # the corpus sensor does not wait for it
        # not judged from here: another host's run, or no host tag on shared storage
        instance.add_run_tags(run_id, {HOST_TAG: "elsewhere"})
        assert run_liveness(instance, instance.get_run_by_id(run_id)).state == UNKNOWN
        assert not recover_dead_runs(instance).failed
        instance.add_run_tags(run_id, {HOST_TAG: HOST})
        assert run_liveness(instance, instance.get_run_by_id(run_id)).state == DEAD
        assert run_liveness(instance, dg.DagsterRun(job_name="j", run_id="x", status=dg.DagsterRunStatus.STARTED),
                            local=False).state == UNKNOWN

        dry = recover_dead_runs(instance, dry_run=True)
        assert [r.run_id for r in dry.failed] == [run_id] and dry.freed == {run_id: ["gpu_step"]}
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED

        done = recover_dead_runs(instance)
        assert [r.run_id for r in done.failed] == [run_id] and done.freed == {run_id: ["gpu_step"]}
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
        assert _gpu_holders(instance) == set()
        again = recover_dead_runs(instance)
        assert not again.failed and not again.freed

        # the slot is free: the next gpu run gets it at once; killed too, then failed by hand (as the UI's
        # "terminate" does) without freeing its slot: the CLI frees the slots of runs that already ended
        proc, second = _start_gpu_run(tmp_path, "second")
        _kill(proc)
        instance.report_run_failed(instance.get_run_by_id(second), "failed by hand")
        assert _gpu_holders(instance) == {second}
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "recover"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "DAGSTER_HOME": str(home)})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["failed"] == [] and report["freed_slots"] == {second: ["gpu_step"]}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert _gpu_holders(instance) == set()
    assert main(["recover", "--dry-run"]) == 0


def test_the_corpus_sensor_tick_recovers_dead_runs(tmp_path, home):
    from pipelines.automation import corpus_refresh_sensor
    from pipelines.resources import ProfileResource, StorageResource

    with dg.DagsterInstance.from_config(str(home)) as instance:
        proc, run_id = _start_gpu_run(tmp_path, "sensor")
        _kill(proc)
        context = dg.build_sensor_context(instance=instance, resources={
            "storage": StorageResource(root=str(tmp_path / "data")), "profile": ProfileResource(name="tiny")})
        assert isinstance(corpus_refresh_sensor(context), dg.SkipReason)
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
        assert _gpu_holders(instance) == set()


def test_a_running_run_recovers_a_holder_that_dies_while_it_waits(tmp_path, home):
    """The slot holder is alive when the waiting run starts (an orphaned step process of a killed run worker
    looks like that) and dies later: the run's watch fails it and frees the slot."""
    from pipelines.recovery import RecoveryWatch

    messages = []
    with dg.DagsterInstance.from_config(str(home)) as instance:
        proc, run_id = _start_gpu_run(tmp_path, "holder")
        with RecoveryWatch(instance, "the-waiting-run", log=messages.append, interval=0.2):
            time.sleep(0.5)
            assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED  # alive: left alone
            _kill(proc)
            deadline = time.time() + 20
            while _gpu_holders(instance):
                assert time.time() < deadline, "the watch never freed the dead run's slot"
                time.sleep(0.1)
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
        assert any("1 dead run(s) failed" in m for m in messages)


def test_the_repository_instance_config_loads_with_run_monitoring(home):
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_max_resume_run_attempts == 0  # the default launcher cannot resume
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] > 0
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1


def test_every_job_recovers_dead_runs_at_its_start():
    from pipelines.definitions import defs, recovering_executor

    for job in defs.resolve_all_job_defs():
        assert job.executor_def is recovering_executor, job.name
        # the same run config as Dagster's default executor
        dg.validate_run_config(job, {"execution": {"config": {"in_process": {}}}})


# --------------------------------------------------------------------------------------------- stale temps
def _touch(path: Path, age_s: float = 0.0, directory: bool = False) -> Path:
    if directory:
        path.mkdir(parents=True)
        (path / "inner.bin").write_bytes(b"x")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    if age_s:
        stamp = time.time() - age_s
        for p in [path, *path.rglob("*")]:
            os.utime(p, (stamp, stamp))
    return path


def test_stale_temps_are_those_whose_owner_is_gone(tmp_path):
    dead, own = _dead_pid(), os.getpid()
    live = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.05)
        started = time.time() - 1  # the stage's start: before the fresh temps below, after the old ones
        d = tmp_path
        stale = [
            _touch(d / f".000001.tar.tmp-{dead}@{HOST}.ab12cd.tmp"),  # dead owner on this host: no matter its age
            _touch(d / f".step-00000004.tmp-{dead}", age_s=60, directory=True),  # trainer style, pid only
            _touch(d / ".x.tmp-123@elsewhere.zz.tmp", age_s=7200),  # another host's, unchanged for 2 h
            _touch(d / ".000002.parquet.k3j4h5.tmp", age_s=60),  # names no owner, older than the stage's start
        ]
        kept = [
            _touch(d / f".000003.tar.tmp-{live.pid}@{HOST}.ab12cd.tmp"),  # a live writer on this host
            _touch(d / f".000004.tar.tmp-{own}@{HOST}.ab12cd.tmp"),  # the caller's own
            _touch(d / f".step-00000008.tmp-{dead}", directory=True),  # pid only, changed since the start
            _touch(d / ".y.tmp-123@elsewhere.zz.tmp", age_s=60),  # another host's, recent: maybe alive there
            _touch(d / ".000005.parquet.k3j4h5.tmp"),  # no owner, newer than the start
            _touch(d / "000000.tar", age_s=60), _touch(d / ".lock", age_s=60),  # not temps
        ]
        assert stale_temp_reason(stale[0], started) == f"owner process {dead} is gone"
        removed = remove_stale_temps(d, started)
        assert sorted(removed) == sorted(stale)
        assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
    finally:
        live.kill()
        live.wait()


def test_each_stage_removes_its_stale_temps_first(tmp_path):
    from PIL import Image

    from pipelines.candidates import generate_partition, plan_candidates
    from pipelines.generation import GenerationRequest
    from pipelines.labels import remove_label_temps
    from trainers.common import remove_stale_training_temps

    dead = _dead_pid()
    live = subprocess.Popen(["sleep", "30"])
    try:
        # candidate shards: a half-written tar and sidecar, the partition's candidates.parquet temp
        shards = tmp_path / "candidate_images" / "p" / "shards"
        gone = [_touch(shards / f".000000.tar.tmp-{dead}@{HOST}.a1.tmp"),
                _touch(shards / f".000000.parquet.tmp-{dead}@{HOST}.a2.tmp"),
                _touch(shards.parent / f".candidates.parquet.tmp-{dead}@{HOST}.a3.tmp")]
        live_temp = _touch(shards / f".000009.tar.tmp-{live.pid}@{HOST}.a4.tmp")
        prompts = [{"prompt_id": "p0", "task": "t2i", "text": "a"}]
        plan = plan_candidates(prompts, {"t2i": {"generator_id": "g", "params": {}}}, 2, 0)

        def requests(chunk):
            return {"t2i": [GenerationRequest(key=c["candidate_id"], text="a", seed=c["seed"]) for c in chunk]}

        table, generated = generate_partition(plan, {"p0": prompts[0]}, requests,
                                              lambda task, rs: [Image.new("RGB", (8, 8)) for _ in rs], shards, 1,
                                              log=lambda m: None)
        assert generated == 2 and len(table) == 2
        assert not any(p.exists() for p in gone) and live_temp.exists()
        assert sorted(p.name for p in shards.iterdir() if not p.name.startswith(".")) == [
            "000000.parquet", "000000.tar", "000001.parquet", "000001.tar"]

        # label parts and the partition's tables
        parts = tmp_path / "reward_labels" / "p" / "parts"
        gone = [_touch(parts / f".000003.parquet.tmp-{dead}@{HOST}.b1.tmp"),
                _touch(parts.parent / f".labels.parquet.tmp-{dead}@{HOST}.b2.tmp")]
        live_temp = _touch(parts / f".000004.parquet.tmp-{live.pid}@{HOST}.b3.tmp")
        assert sorted(remove_label_temps(parts, parts.parent / "labels.parquet")) == sorted(gone)
        assert live_temp.exists()

        # a trainer's checkpoint and adapter temps (pid-only names, directories)
        out = tmp_path / "runs" / "sft" / "r1"
        gone = [_touch(out / "checkpoints" / f".step-00000004.tmp-{dead}", age_s=30, directory=True),
                _touch(out / f".adapter.tmp-{dead}", age_s=30, directory=True),
                _touch(out / f".config.json.tmp-{dead}", age_s=30)]
        # pid 1 lives and started long before: a live trainer (a younger process would not own an older temp)
        kept = [_touch(out / "checkpoints" / ".step-00000008.tmp-1", age_s=30, directory=True),
                _touch(out / "checkpoints" / "step-00000002" / "trainer_state.json", age_s=30)]
        assert sorted(remove_stale_training_temps(out)) == sorted(gone)
        assert all(p.exists() for p in kept)
    finally:
        live.kill()
        live.wait()


# --------------------------------------------------------------------------------------------- corpus manifest
CORPUS_BUILD = """
import os, signal, sys
from collections import Counter
sys.path.insert(0, sys.argv[3])
from test_recovery import DATA, ListSource, INPUTS
from pipelines.corpora import CorpusStore, ShardLimits, build_corpus

root, kill_at = sys.argv[1], sys.argv[2]
if kill_at == "manifest":  # every segment record is written, the manifest is next
    write_json = CorpusStore.write_json
    def killing(self, rel, obj):
        if rel.endswith("manifest.json"):
            os.kill(os.getpid(), signal.SIGKILL)
        return write_json(self, rel, obj)
    CorpusStore.write_json = killing
build_corpus(root, "c", INPUTS, {}, ListSource(DATA, kill_on=kill_at), ShardLimits(max_samples=2))
"""


def _samples(partition: str, n: int) -> list:
    return [({"__key__": f"{partition}-{i}", "txt": f"caption {i}", "bin": f"{partition}{i}".encode() * 50},
             {"task": "t2i", "n": i}) for i in range(n)]


DATA = {p: _samples(p, 3) for p in ("a", "b", "c")}
INPUTS = {"a": "1", "b": "1", "c": "1"}


class ListSource:
    """partition -> samples; ``kill_on``: SIGKILL this process when that partition's samples are first asked
    for (its segment record and the manifest never get written; earlier segments' records are)."""

    def __init__(self, data, kill_on=None):
        self.data, self.kill_on = data, kill_on

    def samples(self, partition, drops: Counter):
        if partition == self.kill_on:
            os.kill(os.getpid(), signal.SIGKILL)
        drops["seen"] += 1
        yield from self.data[partition]

    def reused(self, partition, rows):
        pass


@pytest.mark.parametrize("kill_at,resumed", [("c", ["b"]), ("manifest", ["b", "c"])],
                         ids=["kill-inside-a-segment", "kill-between-records-and-manifest"])
def test_manifest_after_a_killed_build_says_truthfully_what_was_written(tmp_path, kill_at, resumed):
    from pipelines.corpora import ShardLimits, build_corpus, read_manifest, verify_corpus

    killed_root, clean_root = tmp_path / "killed", tmp_path / "clean"
    for root in (killed_root, clean_root):  # the previous version: partition a only
        build_corpus(root, "c", {"a": "1"}, {}, ListSource(DATA), ShardLimits(max_samples=2))
    script = tmp_path / "build.py"
    script.write_text(CORPUS_BUILD)
    proc = subprocess.run([sys.executable, str(script), str(killed_root), kill_at, str(Path(__file__).parent)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    clean = build_corpus(clean_root, "c", INPUTS, {}, ListSource(DATA), ShardLimits(max_samples=2))
    version_dir = killed_root / clean.version
    assert not (version_dir / "manifest.json").exists() and (version_dir / "segments").is_dir()
    stale = _touch(version_dir / "shards" / f".000009.tar.tmp-{_dead_pid()}@{HOST}.q1.tmp")

    rerun = build_corpus(killed_root, "c", INPUTS, {}, ListSource(DATA), ShardLimits(max_samples=2))
    assert rerun.version == clean.version and not stale.exists()
    got, want = read_manifest(version_dir), read_manifest(clean_root / clean.version)
    # b (and c) were written into this version's own shards folder — by the killed attempt — not reused
    assert got["written_partitions"] == want["written_partitions"] == ["b", "c"]
    assert got["reused_partitions"] == want["reused_partitions"] == ["a"]
    assert got["resumed_partitions"] == resumed and want["resumed_partitions"] == []
    assert rerun.written == ["b", "c"] and rerun.reused == ["a"] and rerun.resumed == resumed
    for key in ("shards", "segments", "layouts", "num_samples", "drops", "inputs"):
        assert got[key] == want[key], key
    assert pl.read_parquet(version_dir / "index.parquet").equals(
        pl.read_parquet(clean_root / clean.version / "index.parquet"))
    assert verify_corpus(version_dir) == []
    assert not [p for p in version_dir.rglob(".*")], "temps left behind"


def test_a_segment_the_killed_attempt_wrote_but_latest_now_lends_is_referenced_and_its_record_dropped(tmp_path):
    """The killed attempt at version V wrote b itself (latest held only a); meanwhile another build made b part
    of latest. The rerun of V references b from latest, writes c into V's shard numbers b had used, and drops b's
    record, so a later resume of V can never take b's overwritten shards for its own."""
    from pipelines.corpora import ShardLimits, build_corpus, verify_corpus
    from pipelines.corpus_format import segment_name as _segment_name

    class Failing(ListSource):
        def samples(self, partition, drops):
            if partition == "c":
                raise OSError("killed")
            yield from super().samples(partition, drops)

    limits = ShardLimits(max_samples=2)
    build_corpus(tmp_path, "c", {"a": "1"}, {}, ListSource(DATA), limits)
    with pytest.raises(OSError):
        build_corpus(tmp_path, "c", INPUTS, {}, Failing(DATA), limits)
    middle = build_corpus(tmp_path, "c", {"a": "1", "b": "1"}, {}, ListSource(DATA), limits)
    rerun = build_corpus(tmp_path, "c", INPUTS, {}, ListSource(DATA), limits)
    assert rerun.reused == ["a", "b"] and rerun.written == ["c"] and rerun.resumed == []
    assert not (tmp_path / rerun.version / "segments" / f"{_segment_name('b')}.json").exists()
    assert [s["path"] for s in rerun.manifest["segments"]["b"]["shards"]][0].startswith(f"../{middle.version}/")
    assert verify_corpus(tmp_path / rerun.version) == []
