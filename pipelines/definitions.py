"""The prefmill code location: ``dagster dev -m pipelines.definitions`` / ``dagster asset materialize -m ...``.

Loads fast: no torch, diffusers, transformers or open_clip import happens here."""

import dagster as dg

from assets.candidates import candidate_images
from assets.corpora import preference_corpus, sft_corpus
from assets.evals import dpo_eval, grpo_eval, sft_eval
from assets.labels import reward_labels
from assets.pairs import preference_pairs
from assets.pool import rl_prompt_pool
from assets.prompts import prompt_batches
from assets.training import dpo_run, grpo_run, sft_run
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

ALL_ASSETS = [
    prompt_batches, candidate_images, reward_labels, preference_pairs,
    sft_corpus, preference_corpus, rl_prompt_pool,
    sft_run, dpo_run, grpo_run, sft_eval, dpo_eval, grpo_eval,
]


def build_definitions(data_root: str | None = None, profile: str | None = None) -> dg.Definitions:
    return dg.Definitions(
        assets=ALL_ASSETS,
        jobs=[label_batch_job, corpora_job, training_job, corpus_and_training_job],
        sensors=[prompt_inbox_sensor, corpus_refresh_sensor, training_threshold_sensor],
        schedules=[nightly_refresh_schedule],
        resources=default_resources(data_root, profile),
    )


defs = build_definitions()
