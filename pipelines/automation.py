"""What makes the pipeline run itself: jobs, the inbox sensor, the corpus-refresh and training-threshold sensors,
and the nightly schedule.

    inbox file ──prompt_inbox_sensor──> partition + label_batch_job run
    new labelled partition ──corpus_refresh_sensor──> corpora_job run (one per state of the inputs)
    corpus version with ≥ automation.min_new_samples new samples, its blocking checks passed
        ──training_threshold_sensor──> training_job run for that corpus's trainers and evals

Every sensor decides from what is on disk and in the instance, so a restarted daemon picks up where it was; run
keys make a repeated decision a no-op.
"""

import dagster as dg

from pipelines.partitions import PROMPT_BATCH_PARTITIONS, prompt_batch_partitions
from pipelines.profile_schema import DEFAULT_MIN_NEW_SAMPLES  # automation.min_new_samples; declared there
from pipelines.resources import ProfileResource, StorageResource

PARTITIONED_ASSETS = ["prompt_batches", "candidate_images", "reward_labels", "preference_pairs"]
CORPUS_ASSETS = ["sft_corpus", "preference_corpus", "rl_prompt_pool"]
TRAINING_ASSETS = ["sft_run", "grpo_run", "dpo_run", "sft_eval", "grpo_eval", "dpo_eval"]
# corpus -> the training assets a new version of it starts, and the checks that must have passed first
TRAINERS_OF = {
    "sft_corpus": ["sft_run", "grpo_run", "sft_eval", "grpo_eval"],
    "preference_corpus": ["dpo_run", "dpo_eval"],
}
GATING_CHECKS = {
    "sft_corpus": ["shards_match_manifest"],
    "preference_corpus": ["shards_match_manifest", "label_0_balanced"],
}

label_batch_job = dg.define_asset_job(
    "label_batch_job",
    selection=dg.AssetSelection.assets(*PARTITIONED_ASSETS),
    partitions_def=prompt_batch_partitions,
    description="Prompts of one batch -> candidates -> labels -> pairs.",
)

corpora_job = dg.define_asset_job(
    "corpora_job",
    selection=dg.AssetSelection.assets(*CORPUS_ASSETS),
    description="Corpora and the RL prompt pool from every labelled batch (new versions write only new shards).",
)

training_job = dg.define_asset_job(
    "training_job",
    selection=dg.AssetSelection.assets(*TRAINING_ASSETS),
    description="SFT -> GRPO and DPO on the latest corpus versions, and their evals.",
)

corpus_and_training_job = dg.define_asset_job(
    "corpus_and_training_job",
    selection=(dg.AssetSelection.all() - dg.AssetSelection.assets(*PARTITIONED_ASSETS)
               - dg.AssetSelection.groups("proving")  # the proving ground runs only under `make prove`
               - dg.AssetSelection.groups("subject")),  # a subject run is launched on demand, with its subject
    description="Corpora from every labelled batch, then SFT -> GRPO, DPO, and their evals.",
)


def _load_cursor(context) -> dict:
    import json

    try:
        return json.loads(context.cursor) if context.cursor else {}
    except ValueError:
        return {}


def _dump(cursor: dict) -> str:
    import json

    return json.dumps(cursor, sort_keys=True)


@dg.sensor(job=label_batch_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def prompt_inbox_sensor(context: dg.SensorEvaluationContext, storage: StorageResource) -> dg.SensorResult | dg.SkipReason:
    """Adds a ``prompt_batches`` partition per new batch file in the inbox (a directory or an fsspec URL) and
    requests its run. A file that is not a batch (not UTF-8, no JSON object line, a name clashing with another
    file's, a symlink out of the inbox, not a regular file) is reported once — a warning in the sensor's log and in
    its skip message — and skipped until the file changes; it never stops the other files nor crashes the daemon.

    A registered file whose content changed (its sha256 differs from the ``source_sha256`` of the partition's
    latest materialization, or, before one exists, from the content this sensor requested the run for) is reported
    once per content and its partition re-run (run key ``<key>@<sha256 prefix>``): the partition stays the batch
    file's, not a second partition beside the old one (content-hashed ids make the re-run redo only what changed,
    and drop what was removed). A file is read again only when its listed fingerprint changes."""
    from pipelines.inbox import (batch_file_problem, content_sha256, default_limits, ingested_sha256, list_inbox,
                                 read_batch, shown)

    inbox = storage.inbox_dir
    cursor = _load_cursor(context)
    reported: dict[str, str] = cursor.get("reported", {})
    checked: dict[str, str] = cursor.get("checked", {})  # key -> the file fingerprint last compared
    requested: dict[str, str] = cursor.get("requested", {})  # key -> sha256 of the content a run was requested for
    try:
        files, problems = list_inbox(inbox)
    except Exception as exc:  # noqa: BLE001 - an unreachable inbox is reported, never a daemon crash
        return dg.SkipReason(f"inbox {shown(inbox)} cannot be listed: {type(exc).__name__}: {shown(exc)}")
    known = set(context.instance.get_dynamic_partitions(PROMPT_BATCH_PARTITIONS))
    limits = default_limits()
    new_reports, changes, fresh, reruns = [], [], [], []
    for problem in problems:
        if reported.get(problem) != "collision":
            new_reports.append(problem)
            reported[problem] = "collision"
    for key, file in sorted(files.items()):
        try:
            if key in known:
                if checked.get(key) == file.fingerprint:
                    continue
                digest = content_sha256(read_batch(file))
                # what the partition holds; before its first materialization, what its run was requested for
                before = ingested_sha256(context.instance, key) or requested.get(key)
                checked[key] = file.fingerprint
                if before and before != digest:
                    changes.append(f"{shown(file.url)}: content changed since partition {key!r} took it "
                                   f"(sha256 {before[:16]} -> {digest[:16]}); re-running the partition")
                    reruns.append(dg.RunRequest(partition_key=key, run_key=f"{key}@{digest[:16]}",
                                                tags={"prefmill/trigger": f"inbox file changed: {digest[:16]}"}))
                    requested[key] = digest
                continue
            if reported.get(file.url) == file.fingerprint:
                continue  # reported before and unchanged since
            try:
                data = read_batch(file)
                problem = batch_file_problem(data, limits)
                if not problem:
                    requested[key], checked[key] = content_sha256(data), file.fingerprint
            except Exception as exc:  # noqa: BLE001 - an unreadable file is reported like an unusable one
                problem = f"cannot be read: {type(exc).__name__}: {shown(exc)}"
        except Exception as exc:  # noqa: BLE001 - one file never fails the tick
            problem = f"cannot be checked: {type(exc).__name__}: {shown(exc)}"
            if key in known:
                if reported.get(file.url) != file.fingerprint:
                    new_reports.append(f"{shown(file.url)}: {problem}")
                    reported[file.url] = file.fingerprint
                continue
        if problem:
            new_reports.append(f"{shown(file.url)}: {problem}")
            reported[file.url] = file.fingerprint
        else:
            fresh.append(key)
    for report in new_reports:
        context.log.warning(f"inbox file skipped: {report}")
    for change in changes:
        context.log.warning(f"inbox file changed: {change}")
    cursor["reported"] = reported
    cursor["checked"] = checked
    cursor["requested"] = requested
    if not fresh and not reruns:
        detail = f"; skipped: {' | '.join(new_reports)}" if new_reports else ""
        context.update_cursor(_dump(cursor))
        return dg.SkipReason(f"no new batch files in {shown(inbox)}{detail}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=key, run_key=key) for key in fresh] + reruns,
        dynamic_partitions_requests=[prompt_batch_partitions.build_add_request(fresh)] if fresh else [],
        cursor=_dump(cursor),
    )


def _active_runs(instance, job_name: str) -> int:
    """Runs of ``job_name`` queued or in progress, leaving out runs whose processes are known to be gone (a run
    killed with SIGKILL stays STARTED in the instance; ``pipelines.recovery`` tells)."""
    from dagster import DagsterRunStatus, RunsFilter

    from pipelines.recovery import run_is_dead

    statuses = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
                DagsterRunStatus.STARTED]
    records = instance.get_run_records(RunsFilter(job_name=job_name, statuses=statuses), limit=50)
    return sum(1 for record in records if not run_is_dead(instance, record.dagster_run))


def _recover_dead_runs(context) -> None:
    """The daemon's periodic recovery of launched runs on this host whose run worker is gone (the default run
    launcher gives run monitoring no health check for them): reported failed, pool slots freed. Never fails the
    tick."""
    from pipelines.recovery import recover_dead_runs

    try:
        recovery = recover_dead_runs(context.instance, log=context.log.warning)
    except Exception as exc:  # noqa: BLE001 - a recovery problem must not stop the corpora
        context.log.warning(f"recovery of dead runs skipped: {type(exc).__name__}: {exc}")
        return
    if recovery.failed or recovery.freed:
        context.log.warning(f"recovered dead runs: {recovery.summary()}")


@dg.sensor(job=corpora_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def corpus_refresh_sensor(context: dg.SensorEvaluationContext, storage: StorageResource,
                          profile: ProfileResource) -> dg.RunRequest | dg.SkipReason:
    """Requests a corpora rebuild when the labelled partitions on disk differ from what the latest corpus versions
    were built from (a new batch, or a re-labelled one) and no batch is still being labelled. A batch run whose
    processes are gone (killed: still STARTED in the instance) is not "still labelling": each tick first reports
    such runs of this host failed and frees their pool slots (``pipelines.recovery``)."""
    from labelers.hashing import content_id
    from pipelines.catalog import finished_partitions, input_fingerprints
    from pipelines.corpora import CorpusStore

    _recover_dead_runs(context)
    layout = storage.layout
    state = {}
    stale = []
    for corpus, asset, name in (("sft_corpus", "reward_labels", "labels.parquet"),
                                ("preference_corpus", "preference_pairs", "pairs.parquet")):
        inputs = input_fingerprints(layout, finished_partitions(layout, asset, name), [f"{asset}/{name}"])
        state[corpus] = inputs
        store = CorpusStore(storage.corpus_root(corpus))
        manifest = store.manifest(store.latest())
        built = {p: s["fingerprint"] for p, s in (manifest or {}).get("segments", {}).items()}
        if inputs and inputs != built:
            stale.append(corpus)
    if not stale:
        return dg.SkipReason("the latest corpus versions hold every labelled partition")
    busy = _active_runs(context.instance, label_batch_job.name)
    if busy:
        return dg.SkipReason(f"{busy} batch run(s) still labelling; the corpora wait for them")
    return dg.RunRequest(run_key=f"corpora-{content_id(state)[:16]}",
                         tags={"prefmill/trigger": "new labelled partitions: " + ", ".join(stale)})


def _check_passed(instance, asset: str, check: str) -> bool:
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

    record = instance.get_latest_asset_check_evaluation_record(dg.AssetCheckKey(dg.AssetKey(asset), check))
    return record is not None and record.status == AssetCheckExecutionRecordStatus.SUCCEEDED


@dg.sensor(job=training_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def training_threshold_sensor(context: dg.SensorEvaluationContext, storage: StorageResource,
                              profile: ProfileResource) -> dg.SensorResult | dg.SkipReason:
    """Starts a corpus's trainers (and their evals) when its latest version holds at least
    ``automation.min_new_samples`` more samples than the version they last trained on and that version passed its
    blocking checks — not on every change. The cursor keeps the sample count each corpus last trained at."""
    from pipelines.corpora import CorpusStore

    threshold = int((profile.settings().get("automation") or {}).get("min_new_samples", DEFAULT_MIN_NEW_SAMPLES))
    cursor = _load_cursor(context)
    trained_at: dict[str, int] = cursor.get("trained_at", {})
    requests, waiting = [], []
    for corpus, assets in TRAINERS_OF.items():
        store = CorpusStore(storage.corpus_root(corpus))
        version = store.latest()
        manifest = store.manifest(version)
        if manifest is None:
            waiting.append(f"{corpus}: no version yet")
            continue
        new = manifest["num_samples"] - trained_at.get(corpus, 0)
        if new < threshold:
            waiting.append(f"{corpus}: {new} new samples < {threshold}")
            continue
        failed = [c for c in GATING_CHECKS[corpus] if not _check_passed(context.instance, corpus, c)]
        if failed:
            waiting.append(f"{corpus} {version}: checks not passed: {', '.join(failed)}")
            continue
        requests.append(dg.RunRequest(run_key=f"train-{corpus}-{version}",
                                      asset_selection=[dg.AssetKey(a) for a in assets],
                                      tags={"prefmill/trigger": f"{corpus} {version}: {new} new samples"}))
        trained_at[corpus] = manifest["num_samples"]
    cursor["trained_at"] = trained_at
    if not requests:
        context.update_cursor(_dump(cursor))
        return dg.SkipReason("; ".join(waiting))
    return dg.SensorResult(run_requests=requests, cursor=_dump(cursor))


nightly_refresh_schedule = dg.ScheduleDefinition(
    name="nightly_refresh",
    job=corpus_and_training_job,
    cron_schedule="0 3 * * *",
    description="Rebuild corpora from every labelled batch; trainers rerun only if a corpus version changed.",
)
