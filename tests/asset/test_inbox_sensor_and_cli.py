import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from pipelines.automation import prompt_inbox_sensor
from pipelines.partitions import PROMPT_BATCH_PARTITIONS
from pipelines.resources import StorageResource

REPO = Path(__file__).resolve().parents[2]


def test_sensor_adds_a_partition_per_new_file_and_requests_its_run(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "b1.jsonl").write_text(json.dumps({"task": "t2i", "text": "x"}) + "\n")
    instance = dg.DagsterInstance.ephemeral()
    storage = StorageResource(root=str(tmp_path), inbox=str(inbox))
    result = prompt_inbox_sensor(dg.build_sensor_context(instance=instance, resources={"storage": storage}))
    assert [r.partition_key for r in result.run_requests] == ["b1"]
    assert result.dynamic_partitions_requests[0].partition_keys == ["b1"]
    instance.add_dynamic_partitions(PROMPT_BATCH_PARTITIONS, ["b1"])
    again = prompt_inbox_sensor(dg.build_sensor_context(instance=instance, resources={"storage": storage}))
    assert isinstance(again, dg.SkipReason) and "no new batch files" in again.skip_message


def _tick(sensor, instance, cursor=None, **resources):
    """One evaluation; returns its result and the cursor the daemon would store."""
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    result = sensor(context)
    return result, getattr(result, "cursor", None) or context.cursor


def test_sensor_reports_a_malformed_file_once_and_still_runs_the_good_ones(tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "a").mkdir(parents=True)
    (inbox / "clash.jsonl").write_text(json.dumps({"task": "t2i", "text": "x"}) + "\n")
    (inbox / "a" / "clash.jsonl").write_text(json.dumps({"task": "t2i", "text": "y"}) + "\n")
    (inbox / "binary.jsonl").write_bytes(b"\xff\xfe\x00\x01 not text")
    (inbox / "good.jsonl").write_text(json.dumps({"task": "t2i", "text": "a lighthouse"}) + "\n")
    instance = dg.DagsterInstance.ephemeral()
    storage = StorageResource(root=str(tmp_path), inbox=str(inbox))
    first, cursor = _tick(prompt_inbox_sensor, instance, storage=storage)
    assert [r.partition_key for r in first.run_requests] == ["good"]
    reported = json.loads(cursor)["reported"]
    assert str(inbox / "binary.jsonl") in reported and any("map to partition 'clash'" in k for k in reported)
    instance.add_dynamic_partitions(PROMPT_BATCH_PARTITIONS, ["good"])
    # reported once (a warning in that tick's log); the next ticks stay quiet about them, not retried forever
    second, cursor = _tick(prompt_inbox_sensor, instance, cursor=cursor, storage=storage)
    assert isinstance(second, dg.SkipReason) and "skipped" not in second.skip_message
    # a fixed file is looked at again and becomes a partition
    (inbox / "binary.jsonl").write_text(json.dumps({"task": "t2i", "text": "fixed"}) + "\n")
    third, _ = _tick(prompt_inbox_sensor, instance, cursor=cursor, storage=storage)
    assert [r.partition_key for r in third.run_requests] == ["binary"]


def test_sensor_reports_an_unreadable_inbox_instead_of_crashing(tmp_path):
    storage = StorageResource(root=str(tmp_path), inbox="nosuchprotocol://bucket/inbox")
    result, _ = _tick(prompt_inbox_sensor, dg.DagsterInstance.ephemeral(), storage=storage)
    assert isinstance(result, dg.SkipReason) and "cannot be listed" in result.skip_message


def test_cli_materializes_one_partition_from_an_empty_dagster_home(tmp_path):
    """`dagster asset materialize` through the real CLI, with a DAGSTER_HOME that starts empty."""
    home, data = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    (data / "inbox").mkdir(parents=True)
    (data / "inbox" / "cli-batch.jsonl").write_text(json.dumps({"task": "t2i", "text": "a lighthouse"}) + "\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "PREFMILL_DATA": str(data)}
    bin_dir = Path(sys.executable).parent
    register = subprocess.run([sys.executable, "-m", "pipelines.cli", "register"], env=env, cwd=REPO,
                              capture_output=True, text=True, check=True)
    assert register.stdout.split() == ["cli-batch"]
    run = subprocess.run([str(bin_dir / "dagster"), "asset", "materialize", "-m", "pipelines.definitions",
                          "--select", "prompt_batches", "--partition", "cli-batch"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (data / "prompt_batches" / "cli-batch" / "prompts.parquet").exists()
