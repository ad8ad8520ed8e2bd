"""The order Dagster starts waiting training runs in (assets/training.py's dagster/priority tags): with one pool
slot per GPU (two on `make prove`'s CPU), the SFT -> GRPO chain — the longest path to the evaluations — starts
first, the GRPO runs before the short DPO runs."""

import dagster as dg
from dagster._core.execution.api import create_execution_plan
from dagster._core.execution.plan.active import ActiveExecution
from dagster._core.execution.retries import RetryMode

from pipelines.definitions import defs

RUNS = ["sft_run", "dpo_run", "grpo_run", "grpo_base_run", "dpo_shuffled_run", "grpo_verifier_run"]


def test_waiting_training_runs_start_sft_first_then_grpo_then_dpo():
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey(n) for n in RUNS})
    plan = create_execution_plan(job)
    active = ActiveExecution(plan, RetryMode.DISABLED)
    active.__enter__()  # not exited: the steps are never run, only ordered
    order = [step.key for step in active.get_steps_to_execute()]
    # grpo_run waits for sft_run; the rest are ready together and start in this order as slots free up
    assert order[0] == "sft_run" and "grpo_run" not in order
    assert set(order[1:3]) == {"grpo_base_run", "grpo_verifier_run"}
    assert set(order[3:]) == {"dpo_run", "dpo_shuffled_run"}
    priority = {key: int(plan.get_step_by_key(key).tags.get("dagster/priority", 0)) for key in RUNS}
    # once sft_run is done, grpo_run outranks every run still waiting
    assert priority["grpo_run"] == priority["sft_run"] > max(v for k, v in priority.items() if k not in
                                                              ("sft_run", "grpo_run"))
