"""Jobs, the inbox sensor and the nightly refresh schedule."""

import dagster as dg

from pipelines.partitions import PROMPT_BATCH_PARTITIONS, prompt_batch_partitions
from pipelines.resources import StorageResource

PARTITIONED_ASSETS = ["prompt_batches", "candidate_images", "reward_labels", "preference_pairs"]

label_batch_job = dg.define_asset_job(
    "label_batch_job",
    selection=dg.AssetSelection.assets(*PARTITIONED_ASSETS),
    partitions_def=prompt_batch_partitions,
    description="Prompts of one batch -> candidates -> labels -> pairs.",
)

corpus_and_training_job = dg.define_asset_job(
    "corpus_and_training_job",
    selection=dg.AssetSelection.all() - dg.AssetSelection.assets(*PARTITIONED_ASSETS),
    description="Corpora from every labelled batch, then SFT -> GRPO, DPO, and their evals.",
)


@dg.sensor(job=label_batch_job, minimum_interval_seconds=30)
def prompt_inbox_sensor(context: dg.SensorEvaluationContext, storage: StorageResource) -> dg.SensorResult | dg.SkipReason:
    """Adds a ``prompt_batches`` partition per new batch file in the inbox and requests its run."""
    from pipelines.prompts import PromptFileError, discover_batches

    inbox = storage.inbox_dir
    try:
        batches = discover_batches(inbox)
    except PromptFileError as exc:
        return dg.SkipReason(f"inbox {inbox}: {exc}")
    known = set(context.instance.get_dynamic_partitions(PROMPT_BATCH_PARTITIONS))
    new = sorted(set(batches) - known)
    if not new:
        return dg.SkipReason(f"no new batch files in {inbox}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=key, run_key=f"{key}") for key in new],
        dynamic_partitions_requests=[prompt_batch_partitions.build_add_request(new)],
    )


nightly_refresh_schedule = dg.ScheduleDefinition(
    name="nightly_refresh",
    job=corpus_and_training_job,
    cron_schedule="0 3 * * *",
    description="Rebuild corpora from every labelled batch; trainers rerun only if a corpus version changed.",
)
