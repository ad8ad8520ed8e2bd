"""`make demo`'s terminal filter (pipelines/progress.py): everything to the log, one line per finished step,
progress bars for counted work, trainer metrics condensed, failures always shown."""

import io

from pipelines.progress import condense, run

RUN = "0f92da0f-75df-4638-aefa-7725a0156680"


def _event(level, step, message, pid="7286 - "):
    return f"2026-12-05 22:41:24 +0000 - dagster - {level} - __ASSET_JOB - {RUN} - {pid}{step} - {message}\n"


def test_condense_keeps_finished_steps_failures_and_asset_messages_only():
    assert condense(_event("DEBUG", "reward_labels", 'STEP_START - Started execution of step "reward_labels".')) is None
    assert condense(_event("DEBUG", "reward_labels", 'STEP_SUCCESS - Finished execution of step "reward_labels" in '
                                                     '33.39s.')) == "  ✓ reward_labels (33.39s)"
    failed = condense(_event("ERROR", "sft_run", 'STEP_FAILURE - Execution of step "sft_run" failed.'))
    assert failed.startswith("  ✗ sft_run: STEP_FAILURE")
    assert condense(_event("INFO", "candidate_images", "shard 000001.tar: 256 candidates", pid="")) == \
        "    candidate_images: shard 000001.tar: 256 candidates"
    assert condense("  File \"x.py\", line 3, in <module>\n") is None
    assert condense("Error: Materialization failed.\n") == "Error: Materialization failed."


def test_run_writes_everything_to_the_log_and_draws_bars(tmp_path):
    lines = [_event("DEBUG", "prompt_batches", "STEP_START - ...")]
    lines += [_event("INFO", "reward_labels", f"labelled {k}/64", pid="") for k in range(8, 65, 8)]
    lines += [_event("INFO", "sft_run", '{"step": %d, "loss": 0.5}' % k, pid="") for k in range(1, 101)]
    lines += [_event("DEBUG", "sft_run", 'STEP_SUCCESS - Finished execution of step "sft_run" in 1m.')]
    out = io.StringIO()
    log = tmp_path / "demo.log"
    assert run(iter(lines), log, out) == len(lines)
    assert log.read_text() == "".join(lines)
    shown = out.getvalue().splitlines()
    bars = [s for s in shown if "reward_labels" in s]
    assert len(bars) == 5 and bars[-1].endswith("64/64") and "█" in bars[-1]  # each quarter, not every batch
    assert [s for s in shown if "sft_run: step" in s] == ["    sft_run: step 50 loss 0.5", "    sft_run: step 100 loss 0.5"]
    assert shown[-1] == "  ✓ sft_run (1m)"
