"""The judge protocol: data types, statuses, the answer models (one per rubric) and the chat messages.

* :class:`JudgeItem` in, :class:`JudgeResult` out; a result's ``status`` is one of :data:`STATUSES`.
* An *answer model* (:class:`ObjectModel` of :class:`IntegerField` / :class:`TextField` / :class:`ChoiceField`)
  is the one description of an answer: :meth:`ObjectModel.schema` is the JSON schema the backends constrain
  decoding with (and the prompt quotes), :meth:`ObjectModel.parse` validates an answer against the same fields.
  :func:`judgement_model` builds the model of a rubric (one ``{"score", "feedback"}`` object per dimension);
  the pairwise verdict (:mod:`labelers.pairwise`) is another model built from the same fields.
* :func:`build_messages`: system = rubric + schema (identical for every item of a task, so the shared prefix is
  as long as possible for prefix caching), then the images and the per-item text.

Pure apart from the image objects it carries; no heavy imports.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from labelers.defaults import FEEDBACK_MAX_CHARS  # one home; re-exported here for the judge's callers
from labelers.hashing import content_id
from labelers.judge.safejson import JudgementParseError, decode_json_object
from labelers.rubrics import SCORE_MAX, SCORE_MIN, Rubric

STATUS_OK = "ok"
STATUS_PARSE_ERROR = "parse_error"
STATUS_IMAGE_ERROR = "image_error"
# Set by the labelling stage (not by a judge): a row whose rewards or scores hold a non-finite value (NaN, ±inf).
STATUS_REWARD_ERROR = "reward_error"
STATUSES = (STATUS_OK, STATUS_PARSE_ERROR, STATUS_IMAGE_ERROR, STATUS_REWARD_ERROR)

# The JSON schema type of a score (see judgement_schema); "integer" also makes the parser reject 2.5.
SCORE_TYPE = "integer"
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")


# ----------------------------------------------------------------------------------------------------------------
# Data types
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class JudgeItem:
    """One candidate to judge. ``image`` is the generated image (PIL, or ``None`` when it could not be decoded);
    ``source_image`` is the edit source (task ``edit``); ``reference_images`` the references (task ``multi_ref``),
    optionally typed by ``reference_types`` (subject, style, background, pose, ...)."""

    key: str
    task: str
    text: str
    image: Any | None
    source_image: Any | None = None
    reference_images: Sequence[Any] = ()
    reference_types: Sequence[str] = ()


@dataclass
class JudgeResult:
    key: str
    status: str
    scores: dict[str, float] = field(default_factory=dict)
    feedback: dict[str, str] = field(default_factory=dict)
    raw: str = ""
    error: str | None = None
    attempts: int = 0  # generations spent on this item (0 for image_error)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


# ----------------------------------------------------------------------------------------------------------------
# Answer models: one description gives the JSON schema and the validation
# ----------------------------------------------------------------------------------------------------------------
def feedback_pattern(max_chars: int = FEEDBACK_MAX_CHARS) -> str:
    """Regex of a feedback string: 1..max_chars characters, no control characters, quotes or backslashes."""
    return '^[^\\x00-\\x1f"\\\\]{1,%d}$' % int(max_chars)


def clean_text(text: str) -> str:
    """Control characters collapsed to spaces, runs of white space to one space, ends stripped."""
    return " ".join(_CONTROL_RE.sub(" ", text).split())


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


@dataclass(frozen=True)
class IntegerField:
    """An integer in ``[minimum, maximum]``. The parser takes any JSON number that is an integer (``3.0`` is one,
    as JSON Schema has it; ``2.5`` and booleans are not) and returns it as a float."""

    minimum: int
    maximum: int

    def schema(self) -> dict:
        return {"type": SCORE_TYPE, "minimum": self.minimum, "maximum": self.maximum}

    def validate(self, value: Any, name: str, where: str = "") -> float:
        p = _prefix(where)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise JudgementParseError(f"{p}{name} {value!r} is not a number")
        if (isinstance(value, float) and not math.isfinite(value)) or not self.minimum <= value <= self.maximum:
            raise JudgementParseError(f"{p}{name} {value!r} outside [{self.minimum}, {self.maximum}]")
        if value != int(value):
            raise JudgementParseError(f"{p}{name} {value!r} is not an integer")
        return float(value)


@dataclass(frozen=True)
class TextField:
    """One sentence of text. The schema bounds it to ``max_chars`` with a ``pattern``
    (``^[^\\x00-\\x1f"\\\\]{1,N}$``), not ``maxLength``: xgrammar 0.2.8 does enforce ``maxLength``, but its
    bounded-string rule admits raw control characters (tabs, ``\\x01``...), which a random model emits and which
    make the output invalid strict JSON; with both keywords xgrammar ignores ``maxLength`` (warning). The pattern
    keeps constrained output strict JSON on xgrammar and vLLM's backends alike, and bounds it so even a random
    model terminates. The parser takes any string (unconstrained backends overshoot) and cleans it
    (:func:`clean_text`)."""

    max_chars: int = FEEDBACK_MAX_CHARS

    def schema(self) -> dict:
        return {"type": "string", "pattern": feedback_pattern(self.max_chars)}

    def validate(self, value: Any, name: str, where: str = "") -> str:
        if not isinstance(value, str):
            raise JudgementParseError(f"{_prefix(where)}{name} is {type(value).__name__}, not a string")
        return clean_text(value)


@dataclass(frozen=True)
class ChoiceField:
    """One of ``choices``; the parser ignores case and surrounding white space and returns the canonical choice."""

    choices: tuple[str, ...]

    def schema(self) -> dict:
        return {"type": "string", "enum": list(self.choices)}

    def validate(self, value: Any, name: str, where: str = "") -> str:
        p = _prefix(where)
        if not isinstance(value, str):
            raise JudgementParseError(f"{p}{name} is {type(value).__name__}, not a string")
        canonical = {c.lower(): c for c in self.choices}.get(value.strip().lower())
        if canonical is None:
            raise JudgementParseError(f"{p}{name} {value!r} is not one of {', '.join(map(repr, self.choices))}")
        return canonical


@dataclass(frozen=True)
class ObjectModel:
    """A JSON object with exactly ``fields`` (``((name, field), ...)``, fields being the classes above or nested
    object models), all required, nothing else allowed. ``missing`` / ``extra`` name the keys in error messages
    (``"missing dimension(s) [...]"``); ``title`` goes into the schema."""

    fields: tuple[tuple[str, Any], ...]
    title: str | None = None
    missing: str = "key(s)"
    extra: str = "key(s)"

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.fields]

    def schema(self) -> dict:
        """The JSON schema of the answer (key order kept stable: the prompt quotes it)."""
        out: dict[str, Any] = {"title": self.title} if self.title else {}
        out.update(type="object", properties={name: f.schema() for name, f in self.fields}, required=self.names,
                   additionalProperties=False)
        return out

    def validate(self, data: Any, name: str = "", where: str = "") -> dict[str, Any]:
        """``data`` (decoded JSON) checked field by field; returns ``{name: validated value}`` in field order."""
        p = _prefix(where)
        if not isinstance(data, dict):
            expected = " and ".join(self.names)
            raise JudgementParseError(f"{p}{name}: expected an object with {expected}, got {type(data).__name__}")
        inner = f"{p}{name}" if name else where
        ip = _prefix(inner)
        missing = [n for n in self.names if n not in data]
        if missing:
            raise JudgementParseError(f"{ip}missing {self.missing} {missing}")
        extra = sorted(k for k in data if k not in self.names)
        if extra:
            raise JudgementParseError(f"{ip}unexpected {self.extra} {extra}")
        return {n: f.validate(data[n], n, inner) for n, f in self.fields}

    def parse(self, raw: Any) -> dict[str, Any]:
        """A model's raw answer decoded (:func:`~labelers.judge.safejson.decode_json_object`: bounded, strict
        JSON, one Markdown fence tolerated) and validated; :class:`JudgementParseError` on anything wrong."""
        return self.validate(decode_json_object(raw))


def judgement_model(rubric: Rubric, feedback_max_chars: int = FEEDBACK_MAX_CHARS) -> ObjectModel:
    """The answer model of ``rubric``: one required ``{"score": int 0..5, "feedback": str}`` per dimension."""
    fields = (("score", IntegerField(SCORE_MIN, SCORE_MAX)), ("feedback", TextField(feedback_max_chars)))
    dimension = ObjectModel(fields, missing="field(s)", extra="field(s)")
    return ObjectModel(tuple((name, dimension) for name in rubric.dimension_names),
                       title=f"judgement_{rubric.task}_v{rubric.version}", missing="dimension(s)")


def judgement_schema(rubric: Rubric, feedback_max_chars: int = FEEDBACK_MAX_CHARS) -> dict:
    """JSON schema of a judgement (:func:`judgement_model`'s): one required property per dimension,
    ``{"score": int 0..5, "feedback": str}``, feedback bounded to ``feedback_max_chars`` (see :class:`TextField`)."""
    return judgement_model(rubric, feedback_max_chars).schema()


def parse_judgement(raw: str, rubric: Rubric) -> tuple[dict[str, float], dict[str, str]]:
    """Validate a judge output against ``rubric``'s answer model; returns ``(scores, feedback)`` by dimension.

    Raises :class:`JudgementParseError` on: empty output, text that is not JSON, truncated JSON, a non-object,
    anything :func:`~labelers.judge.safejson.decode_json_object` refuses (too long, too deep, NaN / Infinity,
    absurdly long numbers), duplicate / missing / unexpected keys, a score that is not a number in [0, 5]
    (booleans included) or not an integer (``3.0`` is one, as JSON Schema has it, ``2.5`` is not), feedback that
    is not a string. A single surrounding Markdown code fence (```json ... ```) is tolerated — unconstrained
    backends (an OpenAI-compatible endpoint) often add one. Pure function.
    """
    data = judgement_model(rubric).parse(raw)
    return ({n: v["score"] for n, v in data.items()}, {n: v["feedback"] for n, v in data.items()})


def schema_key(schema: dict) -> str:
    """Cache key of a JSON schema: its canonical JSON (sorted keys, no whitespace)."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def judge_id(model_ref: str, rubric: Rubric) -> str:
    """Deterministic id of (judge model, rubric content): labels made with a different model or rubric differ."""
    return content_id("judge", str(model_ref), rubric.task, rubric.version, rubric.fingerprint)


# ----------------------------------------------------------------------------------------------------------------
# Chat messages
# ----------------------------------------------------------------------------------------------------------------
def system_prompt(rubric: Rubric, feedback_max_chars: int = FEEDBACK_MAX_CHARS) -> str:
    """The task-constant system text: rubric, dimensions, answer format and schema (the shared prefix)."""
    dims = "\n".join(f"- {d.name}: {d.description}" for d in rubric.dimensions)
    keys = ", ".join(f'"{n}"' for n in rubric.dimension_names)
    schema = json.dumps(judgement_schema(rubric, feedback_max_chars), separators=(",", ":"))
    return (
        f"{rubric.system}\n\n"
        f"Dimensions:\n{dims}\n\n"
        f"Answer with one JSON object with exactly the keys {keys}. Each value is an object "
        f'{{"score": <integer {SCORE_MIN}-{SCORE_MAX}>, "feedback": "<one sentence, at most {feedback_max_chars} '
        f'characters>"}}.\nJSON schema: {schema}'
    )


def image_part(image: Any) -> dict:
    """A message part holding an image (decoded RGB PIL)."""
    return {"type": "image", "image": image}


def text_part(text: str) -> dict:
    """A message part holding text."""
    return {"type": "text", "text": text}


def reference_parts(reference_images: Sequence[Any], reference_types: Sequence[str] = ()) -> list[dict]:
    """The parts showing a ``multi_ref`` item's references: ``Reference i (type):`` then the image, one per line."""
    refs = list(reference_images)
    types = list(reference_types) + [""] * (len(refs) - len(reference_types))
    parts: list[dict] = []
    for i, (ref, rtype) in enumerate(zip(refs, types), start=1):
        label = f"Reference {i} ({rtype}):" if rtype else f"Reference {i}:"
        parts += [text_part(("\n" if i > 1 else "") + label), image_part(ref)]
    return parts


def build_messages(item: JudgeItem, rubric: Rubric, feedback_max_chars: int = FEEDBACK_MAX_CHARS) -> list[dict]:
    """Chat messages for one item: system = rubric + schema (shared by all items of the task); user = images
    (references or source first, then the candidate) and the item's text."""
    content: list[dict] = []
    if item.task == "edit":
        content += [text_part("Source image:"), image_part(item.source_image)]
        content += [text_part("\nEdited image:"), image_part(item.image)]
        content.append(text_part(f"\nEdit instruction: {item.text}\nJudge the edited image."))
    elif item.task == "multi_ref":
        content += reference_parts(item.reference_images, item.reference_types)
        content += [text_part("\nGenerated image:"), image_part(item.image)]
        content.append(text_part(f"\nPrompt: {item.text}\nJudge the generated image."))
    else:
        content += [text_part("Generated image:"), image_part(item.image)]
        content.append(text_part(f"\nPrompt: {item.text}\nJudge the generated image."))
    return [
        {"role": "system", "content": [text_part(system_prompt(rubric, feedback_max_chars))]},
        {"role": "user", "content": content},
    ]


def message_images(messages: Iterable[dict]) -> list[Any]:
    """The images of ``messages`` in the order the chat template places their placeholders."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            out += [part["image"] for part in content if part.get("type") == "image"]
    return out
