"""The sensors that make the pipeline run itself: corpora rebuild on new labelled partitions, training past a
threshold of new samples and only after the corpus's blocking checks passed."""

import json
import uuid
from collections import Counter

import dagster as dg
import polars as pl

from pipelines.automation import corpus_refresh_sensor, training_threshold_sensor
from pipelines.catalog import input_fingerprints
from pipelines.corpora import ShardLimits, build_corpus
from pipelines.paths import Layout
from pipelines.resources import ProfileResource, StorageResource


class RowsSource:
    def __init__(self, n):
        self.n = n

    def samples(self, partition, drops: Counter):
        for i in range(self.n):
            yield {"__key__": f"{partition}-{i}", "txt": "x"}, {"task": "t2i", "label_0": float(i % 2)}

    def reused(self, partition, rows):
        pass


def _tick(sensor, instance, cursor=None, **resources):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    result = sensor(context)
    return result, getattr(result, "cursor", None) or context.cursor


def _label_partition(root, partition):
    layout = Layout(root)
    for asset, name in (("reward_labels", "labels.parquet"), ("preference_pairs", "pairs.parquet")):
        path = layout.asset_dir(asset, partition) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame({"id": [partition]}).write_parquet(path)


def _build(root, corpus, partitions, samples_each):
    layout = Layout(root)
    asset, name = ("reward_labels", "labels.parquet") if corpus == "sft_corpus" else ("preference_pairs", "pairs.parquet")
    inputs = input_fingerprints(layout, partitions, [f"{asset}/{name}"])
    return build_corpus(layout.corpus_root(corpus), corpus, inputs, {}, RowsSource(samples_each),
                        ShardLimits(max_samples=100))


def test_corpus_refresh_sensor_requests_a_rebuild_once_per_new_state(tmp_path):
    storage, profile = StorageResource(root=str(tmp_path)), ProfileResource(name="tiny")
    instance = dg.DagsterInstance.ephemeral()
    skip, _ = _tick(corpus_refresh_sensor, instance, storage=storage, profile=profile)
    assert isinstance(skip, dg.SkipReason)  # nothing labelled yet
    _label_partition(tmp_path, "b1")
    request, _ = _tick(corpus_refresh_sensor, instance, storage=storage, profile=profile)
    assert isinstance(request, dg.RunRequest) and request.run_key.startswith("corpora-")
    again, _ = _tick(corpus_refresh_sensor, instance, storage=storage, profile=profile)
    assert again.run_key == request.run_key  # same state, same key: the daemon launches it once
    for corpus in ("sft_corpus", "preference_corpus"):
        _build(tmp_path, corpus, ["b1"], 3)
    done, _ = _tick(corpus_refresh_sensor, instance, storage=storage, profile=profile)
    assert isinstance(done, dg.SkipReason) and "hold every labelled partition" in done.skip_message
    _label_partition(tmp_path, "b2")
    newer, _ = _tick(corpus_refresh_sensor, instance, storage=storage, profile=profile)
    assert isinstance(newer, dg.RunRequest) and newer.run_key != request.run_key


def test_corpus_refresh_waits_for_batches_still_labelling(tmp_path):
    from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus

    storage, profile = StorageResource(root=str(tmp_path)), ProfileResource(name="tiny")
    instance = dg.DagsterInstance.ephemeral()
    _label_partition(tmp_path, "b1")
    instance.add_run(DagsterRun(job_name="label_batch_job", run_id=str(uuid.uuid4()), status=DagsterRunStatus.STARTED))
    result, _ = _tick(corpus_refresh_sensor, instance, storage=storage, profile=profile)
    assert isinstance(result, dg.SkipReason) and "still labelling" in result.skip_message


def _pass_checks(instance, corpus, passed=True):
    for check in ("shards_match_manifest", "label_0_balanced"):
        instance.report_runless_asset_event(dg.AssetCheckEvaluation(asset_key=dg.AssetKey(corpus), check_name=check,
                                                                    passed=passed))


def test_training_starts_past_the_threshold_and_only_after_the_checks_pass(tmp_path):
    storage, profile = StorageResource(root=str(tmp_path)), ProfileResource(name="tiny")  # min_new_samples: 16
    instance = dg.DagsterInstance.ephemeral()
    for p in ("b1", "b2"):
        _label_partition(tmp_path, p)
    _build(tmp_path, "preference_corpus", ["b1"], 10)
    small, cursor = _tick(training_threshold_sensor, instance, storage=storage, profile=profile)
    assert isinstance(small, dg.SkipReason) and "preference_corpus: 10 new samples < 16" in small.skip_message
    version = _build(tmp_path, "preference_corpus", ["b1", "b2"], 10).version  # 20 samples
    _pass_checks(instance, "preference_corpus", passed=False)
    blocked, cursor = _tick(training_threshold_sensor, instance, cursor=cursor, storage=storage, profile=profile)
    assert isinstance(blocked, dg.SkipReason) and "checks not passed" in blocked.skip_message
    _pass_checks(instance, "preference_corpus")
    go, cursor = _tick(training_threshold_sensor, instance, cursor=cursor, storage=storage, profile=profile)
    assert [r.run_key for r in go.run_requests] == [f"train-preference_corpus-{version}"]
    assert {k.to_user_string() for k in go.run_requests[0].asset_selection} == {"dpo_run", "dpo_eval"}
    assert json.loads(cursor)["trained_at"] == {"preference_corpus": 20}
    quiet, cursor = _tick(training_threshold_sensor, instance, cursor=cursor, storage=storage, profile=profile)
    assert isinstance(quiet, dg.SkipReason) and "0 new samples" in quiet.skip_message
