"""Pairwise VLM judging: which of two candidate images is better, asked in both orders to cancel position bias.

* :func:`pairwise_schema` / :func:`build_pairwise_messages` / :func:`parse_verdict`: the answer format
  ``{"verdict": "A" | "B" | "tie", "reason": "<one sentence>"}``, the chat (system = the task rubric's role and
  dimensions + the schema, identical for every pair of a task, so prefix caching applies; user = source or
  references, Image A, Image B, the text), and its strict parser.
* :class:`PairwiseJudge` wraps any judge backend that has ``generate_structured(messages_list, schema, attempt,
  seed)`` and ``judge_id_for(task)`` (``TransformersJudge``, ``VllmJudge``, ``OpenAIJudge``). ``compare(pairs)``
  asks every pair as (A=first, B=second) *and* (A=second, B=first) in one batched call, maps the second answer
  back and combines the two: ``first`` / ``second`` / ``tie`` with ``consistent`` telling whether both orders
  agreed. Answers that contradict each other (both orders say "A": the judge prefers a position, not an image)
  become a ``tie`` with ``consistent=False``. Unparseable answers are regenerated (sampling, ``attempt > 0``) up to
  ``max_retries`` times, only the failed orders, then reported as ``parse_error``; unreadable images are
  ``image_error`` and never reach the model.
* :func:`fit_prompt_strengths` fits Bradley-Terry strengths per prompt from the verdicts (each order's answer is
  one comparison, ties count half a win each way) and :func:`verdicts_to_pairs` turns verdicts into the pairs
  table of DESIGN.md (``p_chosen`` = fitted BT probability, ``margin`` = strength difference,
  ``strategy = "pairwise_judge"``), with drops by reason.

Heavy imports (polars, PIL) happen inside functions; no Dagster. One module of ~500 lines on purpose: the answer
format, the judge and the verdicts-to-pairs step share the verdict type and its outcome mapping.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from labelers.bradley_terry import BTFit, fit_bradley_terry, stable_sigmoid
from labelers.hashing import content_id
from labelers.judge.inputs import load_conditioning, load_image
from labelers.judge.protocol import (
    FEEDBACK_MAX_CHARS,
    STATUS_IMAGE_ERROR,
    STATUS_OK,
    STATUS_PARSE_ERROR,
    ChoiceField,
    ObjectModel,
    TextField,
    image_part,
    reference_parts,
    text_part,
)
from labelers.judge.safejson import JudgementParseError, answer_text, safe_parse
from labelers.rubrics import Rubric, load_rubric

PAIRWISE_PROMPT_VERSION = 1
VERDICTS = ("A", "B", "tie")
OUTCOMES = ("first", "second", "tie")
STRATEGY = "pairwise_judge"
DROP_REASONS = (
    "image_error",       # a verdict whose images could not be read
    "parse_error",       # a verdict whose answers stayed invalid after the retries
    "same_candidate",    # a pair of a candidate with itself
    "inconsistent_tie",  # the two orders contradict each other (both "A" or both "B")
    "inconsistent_win",  # one order picks a winner, the other says tie (dropped when require_consistent)
    "tie",               # both orders say tie (dropped when tie_policy="drop")
    "contradicts_fit",   # the verdict's winner has the lower fitted strength (when drop_contradicting)
    "duplicate",         # the same two candidates of a prompt already made a pair
)


# ----------------------------------------------------------------------------------------------------------------
# Data types
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PairItem:
    """Two candidates of the same prompt to compare. ``image_a`` is the *first* candidate, ``image_b`` the
    *second* (verdicts are expressed in these terms, whatever order the judge saw). ``source_image`` is the
    edit source (task ``edit``), ``reference_images`` the references (task ``multi_ref``). ``prompt_id``,
    ``id_a`` and ``id_b`` (candidate ids) are carried into the verdict for :func:`verdicts_to_pairs`."""

    key: str
    task: str
    text: str
    image_a: Any | None
    image_b: Any | None
    source_image: Any | None = None
    reference_images: Sequence[Any] = ()
    reference_types: Sequence[str] = ()
    prompt_id: str | None = None
    id_a: str | None = None
    id_b: str | None = None


@dataclass
class PairVerdict:
    """The combined verdict on one :class:`PairItem`.

    ``verdict``: ``first`` / ``second`` / ``tie`` (``None`` unless ``status == "ok"``). ``consistent``: both
    orders gave the same (mapped) answer. ``answer_ab`` / ``answer_ba``: the raw ``A``/``B``/``tie`` of the
    order (first, second) and of the swapped order (second, first); ``raw_*`` and ``reason_*`` likewise.
    ``attempts``: generations spent on the pair's harder order (0 for ``image_error``).
    """

    key: str
    status: str
    verdict: str | None = None
    consistent: bool = False
    answer_ab: str | None = None
    answer_ba: str | None = None
    reason_ab: str = ""
    reason_ba: str = ""
    raw_ab: str = ""
    raw_ba: str = ""
    error: str | None = None
    attempts: int = 0
    prompt_id: str | None = None
    id_a: str | None = None
    id_b: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    @property
    def outcomes(self) -> tuple[str, str] | None:
        """Each order's answer mapped to ``first``/``second``/``tie`` (``None`` unless ok)."""
        if not self.ok:
            return None
        return _MAP_AB[self.answer_ab], _MAP_BA[self.answer_ba]


# ----------------------------------------------------------------------------------------------------------------
# Schema, prompt, parser
# ----------------------------------------------------------------------------------------------------------------
def verdict_model(max_reason_chars: int = FEEDBACK_MAX_CHARS) -> ObjectModel:
    """The answer model of a verdict: ``verdict`` in ``A``/``B``/``tie`` (case ignored when parsing) and a
    one-sentence ``reason`` bounded like the pointwise feedback (:class:`~labelers.judge.protocol.TextField`), so a
    constrained random model terminates with strict JSON."""
    return ObjectModel((("verdict", ChoiceField(VERDICTS)), ("reason", TextField(max_reason_chars))),
                       title="pairwise_verdict")


def pairwise_schema(max_reason_chars: int = FEEDBACK_MAX_CHARS) -> dict:
    """JSON schema of a verdict (:func:`verdict_model`'s)."""
    return verdict_model(max_reason_chars).schema()


_TASK_SETUP = {
    "t2i": "You are shown two images, Image A and Image B, generated from the same text prompt.",
    "edit": ("You are shown the source image, then two edited versions of it, Image A and Image B, made with the "
             "same edit instruction."),
    "multi_ref": ("You are shown the reference images (each labelled with its type), then two images, Image A and "
                  "Image B, generated from them with the same prompt."),
}


def pairwise_system_prompt(rubric: Rubric, max_reason_chars: int = FEEDBACK_MAX_CHARS) -> str:
    """The task-constant system text: the rubric's role line, the comparison setup, the rubric's dimensions as
    criteria, the answer format and the schema (the shared prefix of every pair of the task)."""
    role = rubric.system.strip().splitlines()[0].strip()
    setup = _TASK_SETUP.get(rubric.task, _TASK_SETUP["t2i"])
    dims = "\n".join(f"- {d.name}: {d.description}" for d in rubric.dimensions)
    schema = json.dumps(pairwise_schema(max_reason_chars), separators=(",", ":"))
    return (
        f"{role}\n{setup}\n"
        "Decide which image is better overall, weighing all of the dimensions below together. The order in which "
        'the images are shown does not matter. Answer "tie" only if neither image is better.\n\n'
        f"Dimensions:\n{dims}\n\n"
        'Answer with one JSON object {"verdict": "A" | "B" | "tie", "reason": "<one sentence, at most '
        f'{int(max_reason_chars)} characters>"}} and nothing else.\nJSON schema: {schema}'
    )


def build_pairwise_messages(
    task: str,
    text: str,
    image_a: Any,
    image_b: Any,
    source_image: Any = None,
    reference_images: Sequence[Any] = (),
    rubric: Rubric | None = None,
    *,
    reference_types: Sequence[str] = (),
    max_reason_chars: int = FEEDBACK_MAX_CHARS,
) -> list[dict]:
    """Chat messages asking which of ``image_a`` (shown as Image A) and ``image_b`` (Image B) is better.

    System: :func:`pairwise_system_prompt` of ``rubric`` (default: the bundled rubric of ``task``). User: the
    source image (``edit``) or the typed references (``multi_ref``), then Image A, Image B and the text.
    """
    rubric = rubric if rubric is not None else load_rubric(task)
    content: list[dict] = []
    if task == "edit":
        content += [text_part("Source image:"), image_part(source_image)]
        content += [text_part("\nImage A:"), image_part(image_a), text_part("\nImage B:"), image_part(image_b)]
        content.append(text_part(f"\nEdit instruction: {text}\nWhich edited image is better, A or B?"))
    else:
        if task == "multi_ref":
            content += reference_parts(reference_images, reference_types)
        content += [text_part(("\n" if content else "") + "Image A:"), image_part(image_a)]
        content += [text_part("\nImage B:"), image_part(image_b)]
        content.append(text_part(f"\nPrompt: {text}\nWhich image is better, A or B?"))
    return [
        {"role": "system", "content": [text_part(pairwise_system_prompt(rubric, max_reason_chars))]},
        {"role": "user", "content": content},
    ]


def parse_verdict(raw: str) -> tuple[str, str]:
    """Validate a pairwise answer; returns ``(verdict, reason)`` with verdict in ``A``/``B``/``tie``.

    Tolerates one surrounding Markdown code fence and the verdict's case (``"a"``, ``"TIE"``); raises
    :class:`~labelers.judge.safejson.JudgementParseError` on empty or non-JSON text, truncated JSON, a non-object,
    what :func:`~labelers.judge.safejson.decode_json_object` refuses (too long, too deep, NaN / Infinity, absurd
    numbers), duplicate / missing / unexpected keys, a verdict outside A/B/tie, or a reason that is not a string.
    Control characters in the reason are collapsed to spaces. Pure function.
    """
    data = verdict_model().parse(raw)
    return data["verdict"], data["reason"]


_MAP_AB = {"A": "first", "B": "second", "tie": "tie"}  # order (first, second): A is the first candidate
_MAP_BA = {"A": "second", "B": "first", "tie": "tie"}  # swapped order: A is the second candidate
_VALUE = {"first": 1.0, "tie": 0.5, "second": 0.0}


def combine_orders(answer_ab: str, answer_ba: str) -> tuple[str, bool]:
    """``(verdict, consistent)`` from the answers of both orders (``A``/``B``/``tie`` each).

    The answers are mapped to the first candidate's score (win 1, tie ½, loss 0) and averaged: above ½ the
    first candidate wins, below ½ the second, exactly ½ a tie. ``consistent`` is True when both mapped answers
    agree. So ``A, B`` → ``first`` (consistent); ``A, A`` → ``tie`` (inconsistent: a position preference);
    ``A, tie`` → ``first`` (inconsistent, half a preference).
    """
    first, second = _MAP_AB[answer_ab], _MAP_BA[answer_ba]
    share = 0.5 * (_VALUE[first] + _VALUE[second])
    verdict = "first" if share > 0.5 else "second" if share < 0.5 else "tie"
    return verdict, first == second


# ----------------------------------------------------------------------------------------------------------------
# The judge
# ----------------------------------------------------------------------------------------------------------------
def _backend_rubric(backend: Any, task: str) -> Rubric:
    rubric = getattr(backend, "rubric", None)
    return rubric(task) if callable(rubric) else load_rubric(task)


def pairwise_judge_id(backend: Any, task: str, max_reason_chars: int = FEEDBACK_MAX_CHARS) -> str:
    """Id of (the backend's pointwise judge id for ``task`` — model and rubric —, the pairwise prompt and
    schema): pairwise verdicts made with another model, rubric or prompt wording get another id."""
    rubric = _backend_rubric(backend, task)
    return content_id("pairwise_judge", backend.judge_id_for(task), PAIRWISE_PROMPT_VERSION,
                      pairwise_system_prompt(rubric, max_reason_chars))


def prepare_pair(item: PairItem) -> tuple[PairItem | None, str | None]:
    """Decode every image of ``item``: (item with RGB PIL images, None) or (None, image error)."""
    a, err = load_image(item.image_a, "image A")
    if err:
        return None, err
    b, err = load_image(item.image_b, "image B")
    if err:
        return None, err
    source, refs, err = load_conditioning(item.task, item.source_image, item.reference_images, what="pair")
    if err:
        return None, err
    return (
        PairItem(key=item.key, task=item.task, text=item.text, image_a=a, image_b=b, source_image=source,
                 reference_images=tuple(refs), reference_types=tuple(item.reference_types),
                 prompt_id=item.prompt_id, id_a=item.id_a, id_b=item.id_b),
        None,
    )


class PairwiseJudge:
    """Pairwise comparisons on any backend with ``generate_structured`` and ``judge_id_for``.

    ``max_retries`` defaults to the backend's (2 when it has none); ``max_reason_chars`` bounds the reason.
    ``setup()`` / ``teardown()`` forward to the backend.
    """

    def __init__(self, backend: Any, max_retries: int | None = None, max_reason_chars: int = FEEDBACK_MAX_CHARS):
        if not callable(getattr(backend, "generate_structured", None)):
            raise TypeError(f"{type(backend).__name__} has no generate_structured(messages_list, schema, ...)")
        self.backend = backend
        self.max_retries = int(max_retries if max_retries is not None else getattr(backend, "max_retries", 2))
        self.max_reason_chars = int(max_reason_chars)

    def setup(self) -> PairwiseJudge:
        if callable(getattr(self.backend, "setup", None)):
            self.backend.setup()
        return self

    def teardown(self) -> None:
        if callable(getattr(self.backend, "teardown", None)):
            self.backend.teardown()

    def judge_id_for(self, task: str) -> str:
        return pairwise_judge_id(self.backend, task, self.max_reason_chars)

    def messages_for(self, item: PairItem, swapped: bool = False) -> list[dict]:
        a, b = (item.image_b, item.image_a) if swapped else (item.image_a, item.image_b)
        return build_pairwise_messages(
            item.task, item.text, a, b, item.source_image, item.reference_images,
            _backend_rubric(self.backend, item.task), reference_types=item.reference_types,
            max_reason_chars=self.max_reason_chars,
        )

    def compare(self, pairs: Sequence[PairItem]) -> list[PairVerdict]:
        """One :class:`PairVerdict` per pair, in input order. Both orders of every readable pair go to the
        backend in one ``generate_structured`` call per attempt (the backend batches); attempt ``k > 0``
        regenerates only the answers that failed to parse."""
        results: dict[int, PairVerdict] = {}
        ready: list[tuple[int, PairItem]] = []
        for idx, item in enumerate(pairs):
            prepared, err = prepare_pair(item)
            if err:
                results[idx] = PairVerdict(key=item.key, status=STATUS_IMAGE_ERROR, error=err,
                                           prompt_id=item.prompt_id, id_a=item.id_a, id_b=item.id_b)
            else:
                ready.append((idx, prepared))

        schema = pairwise_schema(self.max_reason_chars)
        messages: list[list[dict]] = []
        for _, item in ready:
            messages += [self.messages_for(item), self.messages_for(item, swapped=True)]
        parsed: list[tuple[str, str] | None] = [None] * len(messages)
        raws = [""] * len(messages)
        errors: list[str | None] = [None] * len(messages)
        attempts = [0] * len(messages)
        pending = list(range(len(messages)))
        for attempt in range(self.max_retries + 1):
            if not pending:
                break
            outs = self.backend.generate_structured([messages[k] for k in pending], schema, attempt=attempt, seed=0)
            if len(outs) != len(pending):
                raise RuntimeError(f"judge backend returned {len(outs)} outputs for {len(pending)} prompts")
            failed = []
            for k, raw in zip(pending, outs):
                raws[k], attempts[k] = answer_text(raw), attempt + 1
                try:  # whatever the answer holds, it is this order's parse error at worst
                    parsed[k] = safe_parse(parse_verdict, raw)
                except JudgementParseError as e:
                    errors[k] = e.reason
                    failed.append(k)
            pending = failed

        for r, (idx, item) in enumerate(ready):
            k_ab, k_ba = 2 * r, 2 * r + 1
            common = dict(key=item.key, raw_ab=raws[k_ab], raw_ba=raws[k_ba],
                          attempts=max(attempts[k_ab], attempts[k_ba]),
                          prompt_id=item.prompt_id, id_a=item.id_a, id_b=item.id_b)
            if parsed[k_ab] is None or parsed[k_ba] is None:
                bad = [(name, errors[k]) for name, k in (("order AB", k_ab), ("order BA", k_ba)) if parsed[k] is None]
                reason = "; ".join(f"{name}: {err}" for name, err in bad)
                results[idx] = PairVerdict(status=STATUS_PARSE_ERROR,
                                           error=f"{reason} (after {self.max_retries + 1} attempts)", **common)
                continue
            (ans_ab, reason_ab), (ans_ba, reason_ba) = parsed[k_ab], parsed[k_ba]
            verdict, consistent = combine_orders(ans_ab, ans_ba)
            results[idx] = PairVerdict(status=STATUS_OK, verdict=verdict, consistent=consistent, answer_ab=ans_ab,
                                       answer_ba=ans_ba, reason_ab=reason_ab, reason_ba=reason_ba, **common)
        return [results[i] for i in range(len(pairs))]


# ----------------------------------------------------------------------------------------------------------------
# Verdicts -> Bradley-Terry strengths -> pairs table
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class GroupStrengths:
    """Bradley-Terry strengths of the candidates of one prompt."""

    candidate_ids: list[str]
    fit: BTFit
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._index = {cid: i for i, cid in enumerate(self.candidate_ids)}

    def strength(self, candidate_id: str) -> float:
        return float(self.fit.strengths[self._index[candidate_id]])

    def as_dict(self) -> dict[str, float]:
        return {cid: float(s) for cid, s in zip(self.candidate_ids, self.fit.strengths)}


def _resolve_ids(verdicts: Sequence[PairVerdict], ids: Sequence[tuple[str, str, str]] | None) -> list[tuple]:
    if ids is not None:
        ids = [tuple(t) for t in ids]
        if len(ids) != len(verdicts):
            raise ValueError(f"{len(verdicts)} verdicts but {len(ids)} id triples")
        return ids
    out = [(v.prompt_id, v.id_a, v.id_b) for v in verdicts]
    missing = [v.key for v, t in zip(verdicts, out) if v.ok and any(x is None for x in t)]
    if missing:
        raise ValueError(f"verdict(s) {missing[:5]} lack prompt_id / id_a / id_b: set them on the PairItems or "
                         "pass ids=[(prompt_id, id_a, id_b), ...]")
    return out


def fit_prompt_strengths(
    verdicts: Sequence[PairVerdict],
    ids: Sequence[tuple[str, str, str]] | None = None,
    prior: float = 0.1,
) -> dict[str, GroupStrengths]:
    """Bradley-Terry strengths per prompt from the ``ok`` verdicts (:func:`fit_bradley_terry`, one fit per
    ``prompt_id``). Each order's answer is one comparison (so a consistent verdict is two wins, an
    order-inconsistent one a win each way, a tie half a win each way). ``ids``: ``(prompt_id, id_a, id_b)`` per
    verdict when the verdicts do not carry them."""
    triples = _resolve_ids(verdicts, ids)
    groups: dict[str, list[tuple[str, str, str]]] = {}
    for v, (pid, a, b) in zip(verdicts, triples):
        if not v.ok or a == b:
            continue
        for outcome in v.outcomes:
            groups.setdefault(pid, []).append((a, b, outcome))
    out: dict[str, GroupStrengths] = {}
    for pid, obs in groups.items():
        side_a, side_b, outcome = (np.array(col) for col in zip(*obs))
        cands, inv = np.unique(np.concatenate([side_a, side_b]), return_inverse=True)
        ia, ib = inv[: len(obs)], inv[len(obs) :]
        second = outcome == "second"
        winners = np.where(second, ib, ia)
        losers = np.where(second, ia, ib)
        fit = fit_bradley_terry(len(cands), winners, losers, ties=outcome == "tie", prior=prior)
        out[pid] = GroupStrengths(candidate_ids=[str(c) for c in cands], fit=fit)
    return out


def verdicts_to_pairs(
    verdicts: Sequence[PairVerdict],
    ids: Sequence[tuple[str, str, str]] | None = None,
    strengths: Mapping[str, GroupStrengths | Mapping[str, float]] | None = None,
    *,
    prior: float = 0.1,
    tie_policy: str = "keep",
    require_consistent: bool = True,
    drop_contradicting: bool = False,
    strategy: str = STRATEGY,
) -> tuple[Any, dict[str, int]]:
    """The pairs table (DESIGN.md contract, :func:`labelers.pairs.pairs_schema`) from pairwise verdicts.

    ``ids``: ``(prompt_id, id_a, id_b)`` per verdict (default: the verdicts' own fields, copied from the
    :class:`PairItem`). ``strengths``: per prompt, a :class:`GroupStrengths` or ``{candidate_id: strength}``;
    default :func:`fit_prompt_strengths` with ``prior``. Each kept verdict makes one row: the verdict's winner is
    ``chosen`` (``label`` 1.0), ``margin = s_chosen - s_rejected`` and ``p_chosen = σ(margin)`` from the fitted
    strengths — ≥ 0.5 unless the verdict contradicts the prompt's overall ranking (an intransitive cycle; drop
    those with ``drop_contradicting``). A consistent tie is kept with ``label`` 0.5 (``tie_policy="keep"``; the
    stronger candidate is ``chosen``, so ``p_chosen`` ≥ 0.5) or dropped (``"drop"``). Order-inconsistent ties are
    always dropped; half-consistent wins (one order says tie) are dropped when ``require_consistent``.

    Returns ``(pairs, drops)``; ``drops`` has every key of :data:`DROP_REASONS` (plus any other non-ok status).
    """
    import polars as pl

    from labelers.pairs import pairs_schema

    if tie_policy not in ("keep", "drop"):
        raise ValueError(f"unknown tie_policy {tie_policy!r}; known: ('keep', 'drop')")
    triples = _resolve_ids(verdicts, ids)
    if strengths is None:
        strengths = fit_prompt_strengths(verdicts, triples, prior=prior)

    def strength_of(pid: str, cid: str) -> float:
        group = strengths.get(pid)
        if group is None:
            raise KeyError(f"no strengths for prompt {pid!r}")
        return group.strength(cid) if isinstance(group, GroupStrengths) else float(group[cid])

    drops = {reason: 0 for reason in DROP_REASONS}
    rows: list[dict] = []
    seen: set[tuple[str, str, str]] = set()
    for v, (pid, a, b) in zip(verdicts, triples):
        if not v.ok:
            drops[v.status] = drops.get(v.status, 0) + 1
            continue
        if a == b:
            drops["same_candidate"] += 1
            continue
        if v.verdict == "tie":
            if not v.consistent:
                drops["inconsistent_tie"] += 1
                continue
            if tie_policy == "drop":
                drops["tie"] += 1
                continue
            sa, sb = strength_of(pid, a), strength_of(pid, b)
            chosen, rejected = (a, b) if (sa, b) > (sb, a) else (b, a)  # stronger first; ids break exact ties
            label = 0.5
        else:
            if not v.consistent and require_consistent:
                drops["inconsistent_win"] += 1
                continue
            chosen, rejected = (a, b) if v.verdict == "first" else (b, a)
            label = 1.0
        margin = strength_of(pid, chosen) - strength_of(pid, rejected)
        if label == 1.0 and drop_contradicting and margin < 0:
            drops["contradicts_fit"] += 1
            continue
        unordered = (pid, *sorted((a, b)))
        if unordered in seen:
            drops["duplicate"] += 1
            continue
        seen.add(unordered)
        rows.append({
            "pair_id": content_id(pid, chosen, rejected, strategy),
            "prompt_id": pid,
            "chosen_id": chosen,
            "rejected_id": rejected,
            "p_chosen": float(stable_sigmoid(margin)),
            "margin": float(margin),
            "strategy": strategy,
            "label": label,
        })
    return pl.DataFrame(rows, schema=pairs_schema()), drops
