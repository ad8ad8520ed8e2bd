"""The labelling stage: judge + CLIP scorer over a batch of candidates -> label rows (DESIGN.md ``labels``).

As in NeMo Curator, the model wrappers (:class:`~labelers.judge.TransformersJudge` / ``VllmJudge``,
:class:`~labelers.clip_scorer.ClipScorer`) are built and ``setup()`` by their owner (a Dagster resource) and
handed to the stage; the stage only batches, combines and shapes rows. Either model may be ``None``
(judge-only or CLIP-only labelling), not both.

Per candidate:

* an image that failed to decode -> ``status = image_error``, no scores, the row is kept;
* CLIP_T = cos(image, prompt text); CLIP_I per reference = cos(image, reference) — for ``multi_ref`` the
  prompt's references, for ``edit`` the source image (a detail-preservation proxy), none for ``t2i``;
  ``clip_i`` is the plain mean over references;
* ``lambda_harmonic`` = λ-Harmonic(CLIP_I', CLIP_T, λ[task]) where CLIP_I' is ``clip_i``, or with ``drs``
  configured the mean of the DRS-sharpened per-reference similarities;
* ``reward`` = ``aggregate_reward(judge scores, lambda_harmonic, judge_weight, clip_weight)`` for ``ok`` rows;
  ``null`` for every other status (a judge ``parse_error`` keeps its CLIP scores, raw output and reason, but
  gets no reward, so pair selection skips it);
* a row that would be ``ok`` but holds a non-finite value (NaN, ±inf) in any of its numbers — ``clip_t``,
  ``clip_i``, an entry of ``clip_i_per_ref``, ``lambda_harmonic``, ``preference_score``, a judge score, the
  reward — is ``reward_error`` instead: no reward, ``error`` naming every such field and value
  (``non-finite reward value(s): clip_t=nan, lambda_harmonic=nan, reward=nan``), the stored values left as
  they came (never clamped into range) for diagnosis.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from labelers.defaults import CLIP_WEIGHT, DEFAULT_LAMBDAS, JUDGE_WEIGHT
from labelers.hashing import content_id
from labelers.judge.inputs import prepare_item
from labelers.judge.protocol import STATUS_IMAGE_ERROR, STATUS_OK, STATUS_REWARD_ERROR, JudgeItem
from labelers.rewards import aggregate_reward, drs_clip_i
from labelers.rewards import lambda_harmonic as lambda_harmonic_fn
from labelers.rubrics import all_dimensions

# DEFAULT_LAMBDAS (λ per task, from labelers.defaults) stays importable from here for older callers.


def label_columns(dimensions: Sequence[str] | None = None) -> list[str]:
    dims = list(dimensions) if dimensions is not None else all_dimensions()
    cols = ["candidate_id", "prompt_id", "judge_id"]
    for d in dims:
        cols += [d, f"{d}_feedback"]
    return cols + [
        "clip_t", "clip_i", "clip_i_per_ref", "lambda_harmonic", "preference_score", "reward", "status", "error",
        "raw_judgement",
    ]


def label_schema(dimensions: Sequence[str] | None = None) -> dict:
    """polars schema of the label rows (for empty tables and explicit casts)."""
    import polars as pl

    dims = list(dimensions) if dimensions is not None else all_dimensions()
    schema: dict[str, Any] = {"candidate_id": pl.Utf8, "prompt_id": pl.Utf8, "judge_id": pl.Utf8}
    for d in dims:
        schema[d] = pl.Float64
        schema[f"{d}_feedback"] = pl.Utf8
    schema.update(
        {
            "clip_t": pl.Float64,
            "clip_i": pl.Float64,
            "clip_i_per_ref": pl.List(pl.Float64),
            "lambda_harmonic": pl.Float64,
            "preference_score": pl.Float64,
            "reward": pl.Float64,
            "status": pl.Utf8,
            "error": pl.Utf8,
            "raw_judgement": pl.Utf8,
        }
    )
    return schema


def non_finite_values(row: Mapping[str, Any], dimensions: Sequence[str] = ()) -> list[str]:
    """``name=value`` of every non-finite number among a label row's rewards and scores: ``clip_t``, ``clip_i``,
    ``clip_i_per_ref[k]``, ``lambda_harmonic``, ``preference_score``, ``reward`` and the ``dimensions`` columns
    (nulls are not numbers and do not count)."""

    def bad(value: Any) -> bool:
        if not isinstance(value, numbers.Real) or isinstance(value, numbers.Integral):  # ints are finite
            return False
        return not math.isfinite(value)

    out = []
    for name in ("clip_t", "clip_i"):
        if bad(row.get(name)):
            out.append(f"{name}={row[name]!r}")
    for k, value in enumerate(row.get("clip_i_per_ref") or ()):
        if bad(value):
            out.append(f"clip_i_per_ref[{k}]={value!r}")
    for name in ("lambda_harmonic", "preference_score", *dimensions, "reward"):
        if bad(row.get(name)):
            out.append(f"{name}={row[name]!r}")
    return out


class LabelingStage:
    def __init__(
        self,
        judge: Any | None,
        scorer: Any | None,
        lambdas: Mapping[str, float] | None = None,
        drs: Mapping[str, float] | None = None,
        judge_weight: float = JUDGE_WEIGHT,
        clip_weight: float = CLIP_WEIGHT,
        dimensions: Sequence[str] | None = None,
        preference_scorer: Any | None = None,
    ):
        if judge is None and scorer is None:
            raise ValueError("LabelingStage needs a judge, a CLIP scorer or both")
        self.judge = judge
        self.scorer = scorer
        # A PickScore/HPS-style CLIP checkpoint (optional): its image-text similarity, stored as preference_score.
        self.preference_scorer = preference_scorer
        self.lambdas = {**DEFAULT_LAMBDAS, **dict(lambdas or {})}
        # ``drs``: None, or {k0, k1, tau} (any omitted take DyRef's defaults); a profile's ``enabled`` flag is
        # honoured (``enabled: false`` -> no DRS) and not passed on.
        drs = dict(drs) if drs else None
        if drs is not None and not drs.pop("enabled", True):
            drs = None
        if drs:
            unknown = set(drs) - {"k0", "k1", "tau"}
            if unknown:
                raise ValueError(f"unknown DRS parameter(s) {sorted(unknown)} (k0, k1, tau)")
        self.drs = {k: float(v) for k, v in drs.items()} if drs is not None else None
        # With one model missing, its weight moves to the other (see ``aggregate_reward``), so rewards keep
        # the same [0, judge_weight + clip_weight] scale.
        self.judge_weight = float(judge_weight)
        self.clip_weight = float(clip_weight)
        self.dimensions = list(dimensions) if dimensions is not None else all_dimensions()
        self.columns = label_columns(self.dimensions)

    def judge_id_for(self, task: str) -> str:
        """The ``judge_id`` of this stage's labels for ``task`` (the judge's id; without a judge, a fixed id)."""
        if self.judge is not None:
            return self.judge.judge_id_for(task)
        return content_id("no-judge", task)

    def config_id(self) -> str:
        """Hash of what determines the labels (models, rubrics, λ, DRS, weights): a label-set version."""
        judge_ids = {t: self.judge.judge_id_for(t) for t in self.lambdas} if self.judge is not None else None
        scorer = getattr(self.scorer, "scorer_id", None) if self.scorer is not None else None
        return content_id("labels", judge_ids, scorer, self.lambdas, self.drs, self.judge_weight, self.clip_weight)

    def _empty_row(self, row: Mapping[str, Any]) -> dict:
        out: dict[str, Any] = {c: None for c in self.columns}
        out.update(candidate_id=row["candidate_id"], prompt_id=row["prompt_id"], clip_i_per_ref=[],
                   judge_id=self.judge_id_for(row["task"]))
        return out

    def process_batch(
        self,
        rows: Sequence[Mapping[str, Any]],
        images: Mapping[str, Any],
        sources: Mapping[str, Any] | None = None,
        references: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[dict]:
        """One label row per candidate row, in order.

        ``rows`` need ``candidate_id``, ``prompt_id``, ``task``, ``text`` (the prompt), optionally ``key``;
        ``images`` maps the candidate's ``key`` (or its ``candidate_id``) to a PIL image, or to ``None`` / an
        exception when it could not be read (-> ``image_error`` with that message); ``sources`` / ``references`` map ``prompt_id`` to the edit source image / the list of reference
        images (``reference_types`` may come with the row).
        """
        sources = sources or {}
        references = references or {}
        out = [self._empty_row(r) for r in rows]
        items: list[tuple[int, JudgeItem]] = []
        for i, row in enumerate(rows):
            key = row.get("key")
            image = images.get(key) if key is not None and key in images else images.get(row["candidate_id"])
            task = row["task"]
            item = JudgeItem(
                key=row["candidate_id"],
                task=task,
                text=row.get("text") or "",
                image=image,
                source_image=sources.get(row["prompt_id"]) if task == "edit" else None,
                reference_images=tuple(references.get(row["prompt_id"]) or ()) if task == "multi_ref" else (),
                reference_types=tuple(row.get("reference_types") or ()),
            )
            prepared, err = prepare_item(item)
            if err:
                out[i].update(status=STATUS_IMAGE_ERROR, error=err)
                continue
            items.append((i, prepared))

        # CLIP: one batched pass for the whole batch (references/sources embedded once each).
        clip_scores: dict[int, Any] = {}
        if self.scorer is not None and items:
            refs = [
                list(it.reference_images) if it.task == "multi_ref" else ([it.source_image] if it.task == "edit" else [])
                for _, it in items
            ]
            scores = self.scorer.score([it.image for _, it in items], [it.text for _, it in items], refs)
            clip_scores = {i: s for (i, _), s in zip(items, scores)}

        preference: dict[int, float] = {}
        if self.preference_scorer is not None and items:
            pref = self.preference_scorer.score([it.image for _, it in items], [it.text for _, it in items],
                                                [[] for _ in items])
            preference = {i: s.clip_t for (i, _), s in zip(items, pref)}

        judged: dict[int, Any] = {}
        if self.judge is not None and items:
            results = self.judge.judge([it for _, it in items])
            judged = {i: r for (i, _), r in zip(items, results)}

        for i, it in items:
            row = out[i]
            lam_h = None
            cs = clip_scores.get(i)
            if cs is not None:
                clip_i_for_reward = cs.clip_i
                if self.drs and cs.clip_i_per_ref:
                    clip_i_for_reward = drs_clip_i(cs.clip_i_per_ref, **self.drs)
                lam_h = float(lambda_harmonic_fn(clip_i_for_reward, cs.clip_t, self.lambdas.get(it.task, 0.0)))
                row.update(clip_t=cs.clip_t, clip_i=cs.clip_i, clip_i_per_ref=list(cs.clip_i_per_ref),
                           lambda_harmonic=lam_h)
            if i in preference:
                row["preference_score"] = float(preference[i])
            result = judged.get(i)
            status, error, judge_scores = STATUS_OK, None, None
            if result is not None:
                status, error = result.status, result.error
                row["raw_judgement"] = result.raw or None
                if result.status == STATUS_OK:
                    judge_scores = result.scores
                    for dim, value in result.scores.items():
                        if dim in row:
                            row[dim] = float(value)
                            row[f"{dim}_feedback"] = result.feedback.get(dim)
            row.update(status=status, error=error)
            if status == STATUS_OK:
                if lam_h is None:  # judge only: the judge carries the whole weight
                    mean = sum(judge_scores.values()) / len(judge_scores) / 5.0
                    row["reward"] = float((self.judge_weight + self.clip_weight) * mean)
                else:
                    row["reward"] = float(aggregate_reward(judge_scores, lam_h, self.judge_weight, self.clip_weight))
                bad = non_finite_values(row, self.dimensions)
                if bad:  # a NaN / inf anywhere: no reward, and the row says which value broke it
                    row.update(status=STATUS_REWARD_ERROR, reward=None,
                               error=f"non-finite reward value(s): {', '.join(bad)}")
        return out
