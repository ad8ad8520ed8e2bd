"""Partitions materialized in parallel give the same outputs as one after another.

Four small partitions (2 text-to-image prompts each, from the bundled samples) on the tiny profile:
(a) sequentially, one ``dg.materialize`` per partition in this process, into data root A;
(b) in parallel, into data root B: four ``dagster asset materialize --partition <key>`` processes started together
    on one shared DAGSTER_HOME, each run executing its steps with the multiprocess executor (the CLI's default),
    so the four runs' step processes compete for the same cores and the same data root. The executor starts step
    processes from a forkserver that preloaded the model libraries (``start_method: forkserver``): the same
    executor, one process per step, but each run imports torch/diffusers/transformers once instead of in every
    step process — on 2 busy cores that halves the wall time (measured: one run 96 s with ``spawn``, 49 s with
    ``forkserver``).
The run and step records in (b)'s instance prove the runs and their steps overlapped in time and ran in separate
processes; then every table, image and label of each partition is compared between A and B.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from pipelines.automation import PARTITIONED_ASSETS
from pipelines.definitions import ALL_ASSETS
from pipelines.partitions import PROMPT_BATCH_PARTITIONS
from pipelines.paths import Layout
from pipelines.resources import default_resources

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
KEYS = ["par-a", "par-b", "par-c", "par-d"]
PROMPTS_PER_PARTITION = 2
PROFILE = "tiny"
# pipelines.definitions first: importing pipelines installs the torchvision shim before transformers loads
PRELOAD = ["pipelines.definitions", "torch", "diffusers", "transformers", "open_clip"]
MULTIPROCESS = {"execution": {"config": {"multiprocess": {
    "start_method": {"forkserver": {"preload_modules": PRELOAD}}}}}}


def _env(home: Path, data: Path) -> dict:
    env = {**os.environ, "DAGSTER_HOME": str(home), "PREFMILL_DATA": str(data), "PREFMILL_PROFILE": PROFILE}
    for name in ("PREFMILL_INBOX", "PREFMILL_CORPORA"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def two_ways(tmp_path_factory, t2i_rows, write_batch):
    tmp = tmp_path_factory.mktemp("parallel")
    data_a, data_b, home = tmp / "sequential", tmp / "parallel", tmp / "dagster_home"
    for i, key in enumerate(KEYS):
        rows = t2i_rows[i * PROMPTS_PER_PARTITION:(i + 1) * PROMPTS_PER_PARTITION]
        assert len(rows) == PROMPTS_PER_PARTITION
        for data in (data_a, data_b):
            write_batch(data / "inbox", key, rows)

    # (b) four CLI runs at once on one instance.
    # No pool limits in this instance: the repository's `default_limit: 1` (one GPU) would make the gpu-pool steps
    # of the four runs take turns, and this machine has no GPU to protect.
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = _env(home, data_b)
    register = subprocess.run([sys.executable, "-m", "pipelines.cli", "register"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert register.returncode == 0, register.stderr[-3000:]
    assert sorted(register.stdout.split()) == KEYS
    dagster = str(Path(sys.executable).parent / "dagster")
    started = time.time()
    procs = {}
    for key in KEYS:
        log = open(tmp / f"{key}.log", "w")  # noqa: SIM115 - closed below; a file, not a pipe, never fills up
        procs[key] = (subprocess.Popen([dagster, "asset", "materialize", "-m", "pipelines.definitions",
                                        "--select", ",".join(PARTITIONED_ASSETS), "--partition", key,
                                        "--config-json", json.dumps(MULTIPROCESS)],
                                       env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log)
    try:
        for key, (proc, log) in procs.items():
            proc.wait(timeout=max(1.0, 420 - (time.time() - started)))
    finally:
        for key, (proc, log) in procs.items():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    parallel_s = time.time() - started
    for key, (proc, _) in procs.items():
        assert proc.returncode == 0, f"{key}:\n{(tmp / f'{key}.log').read_text()[-4000:]}"

    # (a) one partition after another, in this process (the in-process executor of dg.materialize).
    started = time.time()
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(PROMPT_BATCH_PARTITIONS, KEYS)
    assets = [a for a in ALL_ASSETS if a.key.to_user_string() in PARTITIONED_ASSETS]
    resources = default_resources(str(data_a), PROFILE)
    for key in KEYS:
        result = dg.materialize(assets, partition_key=key, instance=instance, resources=resources)
        assert result.success, key
    sequential_s = time.time() - started
    print(f"\nparallel (4 CLI runs): {parallel_s:.1f}s, sequential (4 x dg.materialize): {sequential_s:.1f}s")
    return Layout(data_a), Layout(data_b), home


def _step_intervals(instance, run_id) -> dict[str, tuple[float, float]]:
    records = instance.get_records_for_run(
        run_id, of_type={dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS}).records
    starts = {r.event_log_entry.step_key: r.event_log_entry.timestamp for r in records
              if r.event_log_entry.dagster_event_type == dg.DagsterEventType.STEP_START}
    ends = {r.event_log_entry.step_key: r.event_log_entry.timestamp for r in records
            if r.event_log_entry.dagster_event_type == dg.DagsterEventType.STEP_SUCCESS}
    return {step: (starts[step], ends[step]) for step in starts}


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that were open at one moment."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    best = now = 0
    for _, delta in edges:
        now += delta
        best = max(best, now)
    return best


def test_the_four_runs_ran_at_the_same_time_with_the_multiprocess_executor(two_ways):
    _, _, home = two_ways
    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.get_run_records()
        assert sorted(r.dagster_run.tags["dagster/partition"] for r in records) == KEYS
        assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records)
        # every run was in progress at one common moment
        assert max(r.start_time for r in records) < min(r.end_time for r in records)
        steps, pids = [], set()
        for record in records:
            run_id = record.dagster_run.run_id
            logs = instance.all_logs(run_id)
            assert any("multiprocess executor" in (e.message or "") for e in logs), run_id
            # each step ran in a process of its own (not the run's), the multiprocess executor's way
            run_pid = next(e.dagster_event.pid for e in logs
                           if e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.RUN_START)
            step_pids = {e.step_key: e.dagster_event.pid for e in logs
                         if e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.STEP_START}
            assert set(step_pids) == set(PARTITIONED_ASSETS) and run_pid not in step_pids.values()
            pids |= set(step_pids.values())
            steps.append(_step_intervals(instance, run_id))
    assert len(pids) == len(KEYS) * len(PARTITIONED_ASSETS)
    t0 = min(start for run in steps for start, _ in run.values())
    for run in steps:
        print("  ".join(f"{step} {start - t0:5.1f}-{end - t0:5.1f}s" for step, (start, end) in
                        sorted(run.items(), key=lambda item: item[1])))
    # the steps themselves overlapped across runs, the model-heavy ones included
    assert _max_overlap([run["prompt_batches"] for run in steps]) >= 2
    heavy = [run[step] for run in steps for step in ("candidate_images", "reward_labels")]
    assert _max_overlap(heavy) >= 2


def _normalized(frame: pl.DataFrame, root: Path) -> pl.DataFrame:
    """String (and list-of-string) columns with the data root replaced by "<root>": prompt tables hold the paths of
    the images copied into their partition (source_image, reference_images), which differ between data roots
    only by that prefix."""
    exprs = []
    for name, dtype in frame.schema.items():
        if dtype == pl.String:
            exprs.append(pl.col(name).str.replace_all(str(root), "<root>", literal=True))
        elif dtype == pl.List(pl.String):
            exprs.append(pl.col(name).list.eval(pl.element().str.replace_all(str(root), "<root>", literal=True)))
    return frame.with_columns(exprs) if exprs else frame


def _table(layout: Layout, path: Path) -> pl.DataFrame:
    return _normalized(pl.read_parquet(path), layout.root)


def _no_temporal_columns(frame: pl.DataFrame) -> None:
    """Nothing here is a timestamp; the comparisons below are on whole tables."""
    assert not [n for n, t in frame.schema.items() if t.is_temporal()], frame.schema


@pytest.mark.parametrize("key", KEYS)
def test_prompts_candidates_and_images_are_identical(two_ways, key):
    from labelers.hashing import bytes_sha256
    from pipelines.io import read_shard

    a, b, _ = two_ways
    prompts_a, prompts_b = _table(a, a.prompts(key)), _table(b, b.prompts(key))
    _no_temporal_columns(prompts_a)
    assert len(prompts_a) == PROMPTS_PER_PARTITION
    assert_frame_equal(prompts_a, prompts_b, check_exact=True)

    # candidate_id, prompt_id, generator_id, seed, params, size, image_sha256, shard, key: all deterministic
    candidates_a, candidates_b = _table(a, a.candidates(key)), _table(b, b.candidates(key))
    _no_temporal_columns(candidates_a)
    assert len(candidates_a) == PROMPTS_PER_PARTITION * 4  # tiny: seeds_per_prompt 4
    assert_frame_equal(candidates_a, candidates_b, check_exact=True)

    # the stored images themselves, byte for byte, and as the table says
    def images(layout):
        return {sample["__key__"]: bytes_sha256(sample["png"])
                for tar in sorted((layout.asset_dir("candidate_images", key) / "shards").glob("*.tar"))
                for sample in read_shard(tar)}

    images_a = images(a)
    assert images_a == images(b)
    assert images_a == dict(zip(candidates_a["key"], candidates_a["image_sha256"]))


@pytest.mark.parametrize("key", KEYS)
def test_labels_and_pairs_are_identical(two_ways, key):
    a, b, _ = two_ways
    labels_a, labels_b = _table(a, a.labels(key)), _table(b, b.labels(key))
    _no_temporal_columns(labels_a)
    assert len(labels_a) == PROMPTS_PER_PARTITION * 4
    # Every score, feedback sentence, status and reward is identical. Only `diversity` differs legitimately: it is
    # each candidate's leave-one-out FID effect against CLIP-feature moments kept as an EMA across partitions,
    # updated in the order partitions *finish* labelling (pipelines/labels.py add_diversity) — one fixed order in
    # A, whichever finished first in B. Its presence (null or not) does not depend on the order.
    assert "diversity" in labels_a.columns
    assert labels_a["diversity"].is_null().to_list() == labels_b["diversity"].is_null().to_list()
    assert_frame_equal(labels_a.drop("diversity"), labels_b.drop("diversity"), check_exact=True)

    pairs_a, pairs_b = _table(a, a.pairs(key)), _table(b, b.pairs(key))
    _no_temporal_columns(pairs_a)
    assert_frame_equal(pairs_a, pairs_b, check_exact=True)


def test_every_partition_was_folded_into_the_diversity_moments_once(two_ways):
    """The shared EMA moments were updated under their file lock by the four parallel runs: they hold as many
    features as the sequential ones (each partition folded in exactly once, none lost to a race)."""
    from labelers.diversity import FeatureMoments

    a, b, _ = two_ways
    moments = [FeatureMoments.load(layout.asset_dir("reward_labels") / "_diversity"
                                   / "clip_feature_moments.safetensors") for layout in (a, b)]
    ok = [int((pl.read_parquet(a.labels(key))["status"] == "ok").sum()) for key in KEYS]
    # a partition with fewer than 3 ok candidates has no diversity and is not folded in
    assert moments[0].count == moments[1].count == sum(n for n in ok if n >= 3) > 0
