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


def test_sensor_reports_a_broken_inbox_instead_of_crashing(tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "a").mkdir(parents=True)
    (inbox / "x.jsonl").write_text("")
    (inbox / "a" / "x.jsonl").write_text("")  # two files for one partition key
    storage = StorageResource(root=str(tmp_path), inbox=str(inbox))
    result = prompt_inbox_sensor(dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(),
                                                         resources={"storage": storage}))
    assert isinstance(result, dg.SkipReason) and "two inbox files" in result.skip_message


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
