"""Labels: the contract check, and a labelling run killed mid-partition resuming without relabelling."""

import polars as pl
import pytest
from PIL import Image

from labelers.rubrics import all_dimensions, load_rubric
from labelers.stage import label_columns
from labelers.validation import label_problems
from pipelines.io import encode_image, write_shard
from pipelines.labels import label_partition


def _row(cid, task="t2i", status="ok", score=3.0, reward=0.5, error=None):
    row = {c: None for c in label_columns()}
    row.update(candidate_id=cid, prompt_id="p", judge_id="j", status=status, error=error, reward=reward,
               clip_i_per_ref=[])
    if status == "ok":
        for dim in load_rubric(task).dimension_names:
            row[dim], row[f"{dim}_feedback"] = score, "fine."
    return row


def test_valid_labels_have_no_problems():
    labels = pl.DataFrame([_row("a"), _row("b", status="image_error", reward=None, error="undecodable")])
    assert label_problems(labels, {"p": "t2i"}) == []


@pytest.mark.parametrize("row, expected", [
    (_row("a", score=7.0), "out-of-range"),
    (_row("a", reward=None), "without a reward"),
    (_row("a", status="image_error", reward=None), "without an error"),
    (_row("a", status="weird"), "unknown statuses"),
])
def test_contract_violations_are_named(row, expected):
    problems = label_problems(pl.DataFrame([row]), {"p": "t2i"})
    assert any(expected in p for p in problems), problems


class _CountingStage:
    """Stands in for LabelingStage (the real one is exercised in test_judge_model and the e2e test): it counts
    what it labels and can crash on a chosen batch, which is what this test is about."""

    def __init__(self, crash_on_batch=None):
        self.seen, self.batches, self.crash_on_batch = [], 0, crash_on_batch

    def judge_id_for(self, task):
        return f"judge-{task}"

    def process_batch(self, rows, images, sources, references):
        self.batches += 1
        if self.batches == self.crash_on_batch:
            raise RuntimeError("killed")
        self.seen += [r["candidate_id"] for r in rows]
        return [_row(r["candidate_id"]) | {"prompt_id": r["prompt_id"], "judge_id": r["judge_id"]} for r in rows]


def test_killed_labelling_resumes_without_relabelling(tmp_path):
    keys = [f"c{i}" for i in range(7)]
    write_shard(tmp_path / "shards" / "000000.tar",
                [{"__key__": k, "png": encode_image(Image.new("RGB", (8, 8)))} for k in keys])
    candidates = pl.DataFrame({"candidate_id": keys, "prompt_id": ["p"] * 7})
    prompts = pl.DataFrame({"prompt_id": ["p"], "task": ["t2i"], "text": ["x"], "source_image": [None],
                            "reference_images": [[]]}, schema_overrides={"source_image": pl.String,
                                                                         "reference_images": pl.List(pl.String)})
    args = dict(candidates=candidates, prompts=prompts, shard_dir=tmp_path / "shards", parts_dir=tmp_path / "parts",
                out_path=tmp_path / "labels.parquet", batch_size=3, log=lambda m: None)
    first = _CountingStage(crash_on_batch=2)
    with pytest.raises(RuntimeError):
        label_partition(first, **args)
    assert first.seen == keys[:3]

    second = _CountingStage()
    labels, labelled_now = label_partition(second, **args)
    assert second.seen == keys[3:] and labelled_now == 4
    assert labels["candidate_id"].to_list() == keys and labels["candidate_id"].n_unique() == 7

    third = _CountingStage()
    again, labelled_now = label_partition(third, **args)
    assert third.seen == [] and labelled_now == 0 and len(again) == 7


class _FeatureScorer:
    """Stands in for ClipScorer.embed_images (the real one is covered by test_judge_model): features from pixels."""

    def __init__(self):
        self.calls = 0

    def embed_images(self, images):
        import numpy as np
        import torch

        self.calls += 1
        return torch.tensor(np.stack([np.asarray(im, dtype=np.float32).reshape(-1)[:16] / 255.0 for im in images]))


def test_diversity_is_stored_per_partition_and_reused(tmp_path):
    import numpy as np

    from labelers.diversity import FeatureMoments
    from pipelines.labels import add_diversity

    rng = np.random.default_rng(0)
    images = {f"c{i}": Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)) for i in range(6)}
    labels = pl.DataFrame({"candidate_id": list(images), "status": ["ok"] * 5 + ["parse_error"]})
    scorer = _FeatureScorer()
    first = add_diversity(labels, "p1", images, scorer, tmp_path, decay=0.5, log=lambda m: None)
    assert first["diversity"].null_count() == 1 and first.filter(pl.col("status") == "parse_error")["diversity"][0] is None
    moments = FeatureMoments.load(tmp_path / "clip_feature_moments.safetensors")
    assert moments.count == 5
    again = add_diversity(labels, "p1", images, scorer, tmp_path, decay=0.5, log=lambda m: None)
    assert scorer.calls == 1 and again.equals(first)  # reused: not recomputed, not folded into the moments twice
    assert FeatureMoments.load(tmp_path / "clip_feature_moments.safetensors").count == 5
    add_diversity(labels, "p2", images, scorer, tmp_path, decay=0.5, log=lambda m: None)
    assert FeatureMoments.load(tmp_path / "clip_feature_moments.safetensors").count == 10
