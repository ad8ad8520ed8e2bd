"""With the Dagster daemon running and nothing else: a prompt file dropped into the inbox becomes a partition, its
labels, new corpus versions and — past the threshold — a training run; a broken file is reported and skipped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from pipelines.partitions import PROMPT_BATCH_PARTITIONS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["A red fox curled up asleep in fresh snow at dawn", "A lighthouse on a rocky cliff in a storm"]


def _runs(instance, job_name):
    return instance.get_run_records(dg.RunsFilter(job_name=job_name), limit=20)


def _wait(predicate, timeout, what, diagnose):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(3)
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{diagnose()}")


def test_inbox_to_training_with_no_manual_step(tmp_path):
    home, data = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    profile = tmp_path / "tiny_auto.yaml"
    profile.write_text("extends: tiny\nname: tiny_auto\nautomation: {min_new_samples: 1}\n"
                       "training:\n  sft: {max_steps: 2, batch_size: 2, lora_rank: 4, learning_rate: 1.0e-4, "
                       "checkpoint_every: 2}\n  dpo: {max_steps: 2, batch_size: 2, lora_rank: 4, "
                       "learning_rate: 1.0e-4, beta: 2000.0, checkpoint_every: 2}\n"
                       "  grpo: {num_steps: 1, group_size: 2, prompts_per_step: 1, sample_steps: 2, "
                       "learning_rate: 1.0e-4}\n")
    inbox = data / "inbox"
    inbox.mkdir(parents=True)
    (inbox / "broken.jsonl").write_bytes(b"\xff\xfe not a batch")
    (inbox / "dropped.jsonl").write_text("\n".join(json.dumps({"task": "t2i", "text": t}) for t in PROMPTS) + "\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "PREFMILL_DATA": str(data), "PREFMILL_PROFILE": str(profile),
           "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "daemon.log", "w")
    daemon = subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-m",
                               "pipelines.definitions"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        instance = dg.DagsterInstance.from_config(str(home))

        def diagnose():
            lines = (tmp_path / "daemon.log").read_text().splitlines()[-40:]
            runs = [(r.dagster_run.job_name, r.dagster_run.status.value) for r in
                    instance.get_run_records(limit=20)]
            return f"runs: {runs}\ndaemon log tail:\n" + "\n".join(lines)

        def finished(job):
            records = _runs(instance, job)
            failed = [r for r in records if r.dagster_run.status == dg.DagsterRunStatus.FAILURE]
            if failed:
                pytest.fail(f"{job} run failed\n{diagnose()}")
            return any(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records)

        _wait(lambda: "dropped" in instance.get_dynamic_partitions(PROMPT_BATCH_PARTITIONS), 120,
              "the inbox sensor to add the partition", diagnose)
        assert "broken" not in instance.get_dynamic_partitions(PROMPT_BATCH_PARTITIONS)
        _wait(lambda: finished("label_batch_job"), 300, "the batch's labelling run", diagnose)
        assert (data / "preference_pairs" / "dropped" / "pairs.parquet").exists()
        _wait(lambda: finished("corpora_job"), 240, "the corpus refresh run", diagnose)
        assert (data / "corpora" / "sft_corpus" / "latest").exists()
        _wait(lambda: _runs(instance, "training_job"), 150, "a training run past the threshold", diagnose)
        # the broken file was reported (kept in the sensor's cursor so it is not retried) and never ran
        state = next(s for s in instance.all_instigator_state() if s.name == "prompt_inbox_sensor")
        reported = json.loads(state.instigator_data.cursor)["reported"]
        assert any(key.endswith("broken.jsonl") for key in reported), reported
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
        log.close()
