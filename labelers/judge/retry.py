"""The retry driver every judge backend shares (:class:`JudgeBase`): image checks, per-task batching, parsing
and retries.

A backend implements ``generate_structured(messages_list, schema, attempt, seed) -> list[str]`` (one raw answer
per chat, constrained to the JSON ``schema``; greedy at attempt 0, seeded sampling at ``attempt > 0``) or, for
answers that are not model generations (the proving-ground verifier), ``_generate(items, rubric, attempt,
batch_index)``. Every answer goes through the rubric's answer model (:func:`~labelers.judge.protocol.
parse_judgement`); a bad one is retried up to ``max_retries`` times and then reported as ``parse_error`` with
the raw text and the reason — never a silent score. Items without a readable image are ``image_error`` and never
reach the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from labelers.judge.inputs import prepare_item
from labelers.judge.protocol import (
    STATUS_IMAGE_ERROR,
    STATUS_OK,
    STATUS_PARSE_ERROR,
    JudgeItem,
    JudgeResult,
    build_messages,
    judge_id,
    judgement_schema,
    parse_judgement,
)
from labelers.judge.safejson import JudgementParseError, answer_text, safe_parse
from labelers.rubrics import Rubric, load_rubric


def chunks(seq: list, size: int) -> Iterable[list]:
    """``seq`` in consecutive slices of ``size`` (at least 1)."""
    for i in range(0, len(seq), max(1, size)):
        yield seq[i : i + size]


class JudgeBase:
    """Shared driver: image checks, per-task batching, parsing and retries (see the module docstring)."""

    model_ref: str
    batch_size: int
    max_retries: int
    feedback_max_chars: int
    rubric_dir: str | Path | None

    def rubric(self, task: str) -> Rubric:
        return load_rubric(task, self.rubric_dir)

    def judge_id_for(self, task: str) -> str:
        return judge_id(self.model_ref, self.rubric(task))

    def _generate(self, items: list[JudgeItem], rubric: Rubric, attempt: int, batch_index: int) -> list[str]:
        """Raw answers for ``items``: :func:`build_messages` chats under :func:`judgement_schema`, the batch index
        as the sampling seed offset."""
        messages = [build_messages(it, rubric, self.feedback_max_chars) for it in items]
        schema = judgement_schema(rubric, self.feedback_max_chars)
        return self.generate_structured(messages, schema, attempt=attempt, seed=batch_index)

    def generate_structured(self, messages_list: list[list[dict]], schema: dict, attempt: int = 0,
                            seed: int = 0) -> list[str]:
        """One raw answer per chat of ``messages_list``, constrained to the JSON ``schema``; greedy at attempt 0,
        sampling (seeded from the judge's seed, ``attempt`` and ``seed``) when ``attempt > 0``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement generate_structured")

    def judge(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        """Judge ``items``; one result per item, in input order."""
        results: dict[int, JudgeResult] = {}
        ready: list[tuple[int, JudgeItem]] = []
        for idx, item in enumerate(items):
            prepared, err = prepare_item(item)
            if err:
                results[idx] = JudgeResult(key=item.key, status=STATUS_IMAGE_ERROR, error=err)
            else:
                ready.append((idx, prepared))
        by_task: dict[str, list[tuple[int, JudgeItem]]] = {}
        for idx, it in ready:
            by_task.setdefault(it.task, []).append((idx, it))
        for task, pending in by_task.items():
            rubric = self.rubric(task)
            last: dict[int, tuple[str, str]] = {}
            for attempt in range(self.max_retries + 1):
                if not pending:
                    break
                failed: list[tuple[int, JudgeItem]] = []
                for b, chunk in enumerate(chunks(pending, self.batch_size)):
                    raws = self._generate([it for _, it in chunk], rubric, attempt, b)
                    if len(raws) != len(chunk):
                        raise RuntimeError(f"judge backend returned {len(raws)} outputs for {len(chunk)} prompts")
                    for (idx, it), raw in zip(chunk, raws):
                        try:  # whatever the answer holds, it is this item's parse error at worst
                            scores, feedback = safe_parse(parse_judgement, raw, rubric)
                        except JudgementParseError as e:
                            last[idx] = (answer_text(raw), e.reason)
                            failed.append((idx, it))
                            continue
                        results[idx] = JudgeResult(
                            key=it.key, status=STATUS_OK, scores=scores, feedback=feedback, raw=answer_text(raw),
                            attempts=attempt + 1,
                        )
                pending = failed
            for idx, it in pending:
                raw, reason = last[idx]
                results[idx] = JudgeResult(
                    key=it.key, status=STATUS_PARSE_ERROR, raw=raw, attempts=self.max_retries + 1,
                    error=f"{reason} (after {self.max_retries + 1} attempts)",
                )
        return [results[i] for i in range(len(items))]
