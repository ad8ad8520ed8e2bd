"""The prefmill code location: ``dagster dev -m pipelines.definitions`` / ``dagster asset materialize -m ...``.

Loads fast: no torch, diffusers, transformers or open_clip import happens here.

Every job runs with :data:`recovering_executor`: Dagster's default executor (multiprocess, or in-process; same
run config), which at the start of each run — in the run worker, before any step claims a pool slot — fails the
runs of this host whose processes are gone and frees their slots (``pipelines.recovery``), and checks again every
30 s while it runs. A run killed with SIGKILL therefore never blocks the ``gpu`` pool for the next one: running the
same command again is the recovery.
"""

import dagster as dg

from assets.candidates import candidate_images
from assets.corpora import preference_corpus, sft_corpus
from assets.evals import dpo_eval, grpo_eval, sft_eval
from assets.labels import reward_labels
from assets.pairs import preference_pairs
from assets.pool import rl_prompt_pool
from assets.proving import PROVING_ASSETS
from assets.prompts import prompt_batches
from assets.subject import subject_run
from assets.training import ar_grpo_run, dpo_run, grpo_run, sft_run
from pipelines.automation import (
    corpora_job,
    corpus_and_training_job,
    corpus_refresh_sensor,
    label_batch_job,
    nightly_refresh_schedule,
    prompt_inbox_sensor,
    training_job,
    training_threshold_sensor,
)
from pipelines.resources import default_resources


class _RecoveringExecutor(dg.Executor):
    """Dagster's executor for the run, after :func:`pipelines.recovery.start_of_run`."""

    def __init__(self, inner: dg.Executor):
        self._inner = inner

    def execute(self, plan_context, execution_plan):
        from pipelines.recovery import RecoveryWatch, start_of_run

        start_of_run(plan_context.instance, plan_context.run_id, log=plan_context.log.info)
        with RecoveryWatch(plan_context.instance, plan_context.run_id, log=plan_context.log.info):
            yield from self._inner.execute(plan_context, execution_plan)

    @property
    def retries(self):
        return self._inner.retries

    @property
    def step_dependency_config(self):
        return self._inner.step_dependency_config

    def get_step_event_or_retry_event(self, *args, **kwargs):
        return self._inner.get_step_event_or_retry_event(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _recovering_executor(init_context) -> dg.Executor:
    return _RecoveringExecutor(dg.multi_or_in_process_executor.executor_creation_fn(init_context))


recovering_executor = dg.ExecutorDefinition(
    name="prefmill_executor",
    config_schema=dg.multi_or_in_process_executor.config_schema,
    requirements=dg.multi_or_in_process_executor.get_requirements,
    executor_creation_fn=_recovering_executor,
    description="Dagster's multi_or_in_process_executor (same config), recovering dead runs of this host first.",
)

ALL_ASSETS = [
    prompt_batches, candidate_images, reward_labels, preference_pairs,
    sft_corpus, preference_corpus, rl_prompt_pool,
    sft_run, dpo_run, grpo_run, sft_eval, dpo_eval, grpo_eval, ar_grpo_run,
    *PROVING_ASSETS,
    subject_run,
]


def build_definitions(data_root: str | None = None, profile: str | None = None,
                      executor: dg.ExecutorDefinition | None = None) -> dg.Definitions:
    """``executor``: the executor of every job (default :data:`recovering_executor`)."""
    return dg.Definitions(
        assets=ALL_ASSETS,
        jobs=[label_batch_job, corpora_job, training_job, corpus_and_training_job],
        sensors=[prompt_inbox_sensor, corpus_refresh_sensor, training_threshold_sensor],
        schedules=[nightly_refresh_schedule],
        resources=default_resources(data_root, profile),
        executor=executor or recovering_executor,
    )


defs = build_definitions()
