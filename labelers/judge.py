"""VLM judges: score an image on a task's rubric dimensions (0–5 each) with one sentence of feedback per dimension.

Backends share the data types, the prompt and the parser:

* :class:`TransformersJudge`: ``AutoProcessor`` + ``AutoModelForImageTextToText`` loaded once in ``setup()``;
  batched generation with left padding and grammar-constrained decoding through xgrammar (a per-sequence
  ``GrammarMatcher`` applied as a logits processor), so even a random model produces schema-valid JSON.
* :class:`VllmJudge`: vLLM's offline engine (GPU extra) with structured JSON output and prefix caching.

Both also expose ``generate_structured(messages_list, schema, attempt, seed)``: raw answers to arbitrary chats
under an arbitrary JSON schema (the pairwise judge, :mod:`labelers.pairwise`, uses it); pointwise judging is
``generate_structured`` on :func:`build_messages` chats with :func:`judgement_schema`.

Every output goes through :func:`parse_judgement`. A bad output is retried (sampling, another seed) up to
``max_retries`` times and then reported as ``parse_error`` with the raw text and the reason — never a silent
score. Whatever one answer holds (absurdly long numbers, absurd nesting, NaN, a non-integer score, a backend's
:class:`BadAnswer`) it is that item's ``parse_error``, never an exception for the batch (:func:`safe_parse`,
:func:`guarded_json_loads`). Items without a readable image are ``image_error`` and never reach the model.

Messages put the rubric *and* the JSON schema in the system message (identical for every item of a task), then
the images and the per-item text, so the shared prefix is as long as possible for prefix caching.

Heavy imports (torch, transformers, xgrammar, vllm) happen inside functions.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelers.hashing import content_id
from labelers.torch_compat import torch_threads
from labelers.rubrics import SCORE_MAX, SCORE_MIN, Rubric, load_rubric

STATUS_OK = "ok"
STATUS_PARSE_ERROR = "parse_error"
STATUS_IMAGE_ERROR = "image_error"
# Set by the labelling stage (not by a judge): a row whose rewards or scores hold a non-finite value (NaN, ±inf).
STATUS_REWARD_ERROR = "reward_error"
STATUSES = (STATUS_OK, STATUS_PARSE_ERROR, STATUS_IMAGE_ERROR, STATUS_REWARD_ERROR)

FEEDBACK_MAX_CHARS = 120
# Bounds on one answer, checked before / while decoding it (a judgement is a few hundred characters, two levels
# deep, with one-digit integers): anything beyond is that item's parse_error, never an exception for the batch.
MAX_ANSWER_CHARS = 65_536
MAX_JSON_DEPTH = 16
MAX_NUMBER_CHARS = 32
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


class JudgementParseError(ValueError):
    """A judge output is not a valid judgement; ``reason`` says why in one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------------
# Schema, parsing, ids
# ----------------------------------------------------------------------------------------------------------------
def feedback_pattern(max_chars: int = FEEDBACK_MAX_CHARS) -> str:
    """Regex of a feedback string: 1..max_chars characters, no control characters, quotes or backslashes."""
    return '^[^\\x00-\\x1f"\\\\]{1,%d}$' % int(max_chars)


def judgement_schema(rubric: Rubric, feedback_max_chars: int = FEEDBACK_MAX_CHARS) -> dict:
    """JSON schema of a judgement: one required property per dimension, ``{"score": int 0..5, "feedback": str}``.

    ``feedback`` is bounded to ``feedback_max_chars`` so even a random model terminates. The bound is a
    ``pattern`` (``^[^\\x00-\\x1f"\\\\]{1,N}$``), not ``maxLength``: xgrammar 0.2.8 does enforce ``maxLength``,
    but its bounded-string rule admits raw control characters (tabs, ``\\x01``...), which a random model emits
    and which make the output invalid strict JSON; with both keywords xgrammar ignores ``maxLength`` (warning).
    The pattern keeps constrained output strict JSON on xgrammar and vLLM's backends alike.
    """
    dim_schema = {
        "type": "object",
        "properties": {
            "score": {"type": SCORE_TYPE, "minimum": SCORE_MIN, "maximum": SCORE_MAX},
            "feedback": {"type": "string", "pattern": feedback_pattern(feedback_max_chars)},
        },
        "required": ["score", "feedback"],
        "additionalProperties": False,
    }
    names = list(rubric.dimension_names)
    return {
        "title": f"judgement_{rubric.task}_v{rubric.version}",
        "type": "object",
        "properties": {name: dim_schema for name in names},
        "required": names,
        "additionalProperties": False,
    }


_FENCE_RE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise JudgementParseError(f"duplicate key {k!r}")
        out[k] = v
    return out


class BadAnswer(Exception):
    """What a backend hands over in place of an answer it could not read (an HTTP answer that is not a chat
    completion, say): the parsers report ``reason`` as that item's parse error and keep ``raw`` (text, possibly
    empty) as its raw output, so the item is retried and then ``parse_error`` like any other bad answer."""

    def __init__(self, reason: str, raw: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


def answer_text(raw: Any, limit: int = MAX_ANSWER_CHARS) -> str:
    """The text kept as an answer's raw output: ``raw`` when it is text (cut to ``limit`` characters, with a note
    of how many were dropped), a :class:`BadAnswer`'s ``raw``, ``""`` for ``None``, else its ``repr`` (cut)."""
    if isinstance(raw, BadAnswer):
        raw = raw.raw
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raw = repr(raw)
    if len(raw) > limit:
        return f"{raw[:limit]}...[{len(raw) - limit} more characters]"
    return raw


_JSON_SYNTAX_RE = re.compile(r'[\[\]{}"\\]')


def json_depth_exceeds(text: str, limit: int) -> bool:
    """Whether the arrays/objects of the JSON ``text`` nest deeper than ``limit`` (brackets inside strings do not
    count). One linear scan, no recursion: run before ``json.loads``, whose decoder recurses once per level."""
    depth, in_string, escaped_at = 0, False, -1
    for m in _JSON_SYNTAX_RE.finditer(text):
        pos, c = m.start(), m.group()
        if pos == escaped_at:
            continue
        if in_string:
            if c == "\\":
                escaped_at = pos + 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > limit:
                return True
        elif c in "]}":
            depth = max(0, depth - 1)
    return False


def _refuse_constant(name: str) -> Any:
    raise JudgementParseError(f"non-finite number {name} (not JSON)")


def _parse_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_NUMBER_CHARS:
        raise JudgementParseError(f"number with {digits} digits (more than {MAX_NUMBER_CHARS})")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise JudgementParseError(f"number with {len(text)} characters (more than {MAX_NUMBER_CHARS})")
    value = float(text)
    if not math.isfinite(value):
        raise JudgementParseError(f"number {text} overflows to {value}")
    return value


def guarded_json_loads(text: str, max_chars: int = MAX_ANSWER_CHARS, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)`` for text nobody vouches for; every failure is a :class:`JudgementParseError`.

    Before decoding: at most ``max_chars`` characters and ``max_depth`` levels of nesting. While decoding:
    ``NaN`` / ``Infinity`` / ``-Infinity`` are refused, numbers are at most :data:`MAX_NUMBER_CHARS` characters
    (Python refuses to convert integers of over 4300 digits, and a long float overflows to ``inf``), object keys
    are unique, raw control characters inside strings are tolerated (``strict=False``; callers clean the text
    fields). Whatever still goes wrong inside the decoder (``RecursionError``, ``ValueError``,
    ``OverflowError``) becomes a parse error too."""
    if len(text) > max_chars:
        raise JudgementParseError(f"output too long ({len(text)} characters, at most {max_chars})")
    if json_depth_exceeds(text, max_depth):
        raise JudgementParseError(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text, strict=False, object_pairs_hook=_no_duplicate_keys, parse_int=_parse_int,
                          parse_float=_parse_float, parse_constant=_refuse_constant)
    except JudgementParseError:
        raise
    except json.JSONDecodeError as e:
        if e.pos >= len(text) or e.msg.startswith("Unterminated string"):
            raise JudgementParseError(f"truncated JSON ({e.msg} at char {e.pos} of {len(text)})") from None
        raise JudgementParseError(f"not JSON ({e.msg} at char {e.pos}): {text[:60]!r}") from None
    except (RecursionError, ValueError, OverflowError, TypeError) as e:
        raise JudgementParseError(f"undecodable JSON ({type(e).__name__}: {str(e)[:120]})") from None


def decode_json_object(raw: Any) -> dict:
    """A model's output as a JSON object, or :class:`JudgementParseError` naming what is wrong: not text (or a
    backend's :class:`BadAnswer`), empty, too long, nested too deep, not JSON, truncated JSON, a non-finite or
    absurdly long number, duplicate keys, not an object (see :func:`guarded_json_loads`). A single surrounding
    Markdown code fence is tolerated, and so are raw control characters inside strings."""
    if isinstance(raw, BadAnswer):
        raise JudgementParseError(raw.reason)
    if not isinstance(raw, str):
        raise JudgementParseError(f"output is {type(raw).__name__}, not text")
    text = raw.strip()
    if not text:
        raise JudgementParseError("empty output")
    if len(text) > MAX_ANSWER_CHARS:  # before the fence regex, too
        raise JudgementParseError(f"output too long ({len(text)} characters, at most {MAX_ANSWER_CHARS})")
    fence = _FENCE_RE.match(text)
    if fence:
        text = fence.group(1).strip()
    data = guarded_json_loads(text)
    if not isinstance(data, dict):
        raise JudgementParseError(f"expected a JSON object, got {type(data).__name__}")
    return data


def safe_parse(parse: Any, raw: Any, *args: Any) -> Any:
    """``parse(raw, *args)`` with any failure turned into a :class:`JudgementParseError`: the parsers raise only
    that by design, and should a hostile answer still break one (``RecursionError``, ``ValueError``, ...), the
    answer is that item's parse error, retried and reported, never an exception for the whole batch."""
    try:
        return parse(raw, *args)
    except JudgementParseError:
        raise
    except Exception as e:  # noqa: BLE001 - one answer must not fail the batch
        raise JudgementParseError(f"unreadable answer ({type(e).__name__}: {str(e)[:120]})") from None


def parse_judgement(raw: str, rubric: Rubric) -> tuple[dict[str, float], dict[str, str]]:
    """Validate a judge output against ``rubric``; returns ``(scores, feedback)`` keyed by dimension.

    Raises :class:`JudgementParseError` on: empty output, text that is not JSON, truncated JSON, a non-object,
    anything :func:`decode_json_object` refuses (too long, too deep, NaN / Infinity, absurdly long numbers),
    duplicate / missing / unexpected keys, a score that is not a number in [0, 5] (booleans included) or not an
    integer (the schema's ``"type": "integer"``; ``3.0`` is one, as JSON Schema has it, ``2.5`` is not),
    feedback that is not a string. A single surrounding Markdown code fence (```json ... ```) is tolerated —
    unconstrained backends (an OpenAI-compatible endpoint) often add one. Pure function.
    """
    data = decode_json_object(raw)
    names = list(rubric.dimension_names)
    missing = [n for n in names if n not in data]
    if missing:
        raise JudgementParseError(f"missing dimension(s) {missing}")
    extra = sorted(k for k in data if k not in names)
    if extra:
        raise JudgementParseError(f"unexpected key(s) {extra}")
    scores: dict[str, float] = {}
    feedback: dict[str, str] = {}
    for name in names:
        entry = data[name]
        if not isinstance(entry, dict):
            raise JudgementParseError(f"{name}: expected an object with score and feedback, got {type(entry).__name__}")
        missing_fields = [f for f in ("score", "feedback") if f not in entry]
        if missing_fields:
            raise JudgementParseError(f"{name}: missing field(s) {missing_fields}")
        extra_fields = sorted(k for k in entry if k not in ("score", "feedback"))
        if extra_fields:
            raise JudgementParseError(f"{name}: unexpected field(s) {extra_fields}")
        score = entry["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise JudgementParseError(f"{name}: score {score!r} is not a number")
        if (isinstance(score, float) and not math.isfinite(score)) or not SCORE_MIN <= score <= SCORE_MAX:
            raise JudgementParseError(f"{name}: score {score!r} outside [{SCORE_MIN}, {SCORE_MAX}]")
        if SCORE_TYPE == "integer" and score != int(score):
            raise JudgementParseError(f"{name}: score {score!r} is not an integer")
        fb = entry["feedback"]
        if not isinstance(fb, str):
            raise JudgementParseError(f"{name}: feedback is {type(fb).__name__}, not a string")
        scores[name] = float(score)
        feedback[name] = " ".join(_CONTROL_RE.sub(" ", fb).split())
    return scores, feedback


def schema_key(schema: dict) -> str:
    """Cache key of a JSON schema: its canonical JSON (sorted keys, no whitespace)."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def judge_id(model_ref: str, rubric: Rubric) -> str:
    """Deterministic id of (judge model, rubric content): labels made with a different model or rubric differ."""
    return content_id("judge", str(model_ref), rubric.task, rubric.version, rubric.fingerprint)


# ----------------------------------------------------------------------------------------------------------------
# Prompting
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


def _image_part(image: Any) -> dict:
    return {"type": "image", "image": image}


def _text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def build_messages(item: JudgeItem, rubric: Rubric, feedback_max_chars: int = FEEDBACK_MAX_CHARS) -> list[dict]:
    """Chat messages for one item: system = rubric + schema (shared by all items of the task); user = images
    (references or source first, then the candidate) and the item's text."""
    content: list[dict] = []
    if item.task == "edit":
        content += [_text_part("Source image:"), _image_part(item.source_image)]
        content += [_text_part("\nEdited image:"), _image_part(item.image)]
        content.append(_text_part(f"\nEdit instruction: {item.text}\nJudge the edited image."))
    elif item.task == "multi_ref":
        types = list(item.reference_types) + [""] * (len(item.reference_images) - len(item.reference_types))
        for i, (ref, rtype) in enumerate(zip(item.reference_images, types), start=1):
            label = f"Reference {i} ({rtype}):" if rtype else f"Reference {i}:"
            content += [_text_part(("\n" if i > 1 else "") + label), _image_part(ref)]
        content += [_text_part("\nGenerated image:"), _image_part(item.image)]
        content.append(_text_part(f"\nPrompt: {item.text}\nJudge the generated image."))
    else:
        content += [_text_part("Generated image:"), _image_part(item.image)]
        content.append(_text_part(f"\nPrompt: {item.text}\nJudge the generated image."))
    return [
        {"role": "system", "content": [_text_part(system_prompt(rubric, feedback_max_chars))]},
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


def _load_image(image: Any, what: str) -> tuple[Any | None, str | None]:
    """(RGB PIL image, None) or (None, reason). Accepts PIL images, paths and encoded bytes."""
    from PIL import Image

    if image is None:
        return None, f"missing {what}"
    if isinstance(image, BaseException):  # a loader's error handed over in place of the image
        return None, f"unreadable {what}: {type(image).__name__}: {image}"
    try:
        if isinstance(image, Image.Image):
            image.load()
            return image.convert("RGB"), None
        if isinstance(image, (bytes, bytearray)):
            import io

            with Image.open(io.BytesIO(image)) as im:
                return im.convert("RGB"), None
        if isinstance(image, (str, Path)):
            with Image.open(image) as im:
                return im.convert("RGB"), None
    except Exception as e:  # noqa: BLE001 - any decoding failure makes the item unjudgeable
        return None, f"unreadable {what}: {type(e).__name__}: {e}"
    return None, f"unsupported {what} type {type(image).__name__}"


def load_conditioning(task: str, source_image: Any, reference_images: Sequence[Any],
                      what: str = "item") -> tuple[Any | None, list[Any], str | None]:
    """Decode what a task conditions on: the edit source (``edit``) and the references (``multi_ref``).
    Returns (source, references, None) or (None, [], image error)."""
    source = None
    if task == "edit":
        source, err = _load_image(source_image, "source image")
        if err:
            return None, [], err
    refs = []
    if task == "multi_ref":
        if not reference_images:
            return None, [], f"multi_ref {what} without reference images"
        for i, ref in enumerate(reference_images):
            img, err = _load_image(ref, f"reference image {i}")
            if err:
                return None, [], err
            refs.append(img)
    return source, refs, None


def prepare_item(item: JudgeItem) -> tuple[JudgeItem | None, str | None]:
    """Decode every image of ``item``; returns (item with RGB PIL images, None) or (None, image error)."""
    image, err = _load_image(item.image, "image")
    if err:
        return None, err
    source, refs, err = load_conditioning(item.task, item.source_image, item.reference_images)
    if err:
        return None, err
    return (
        JudgeItem(
            key=item.key,
            task=item.task,
            text=item.text,
            image=image,
            source_image=source,
            reference_images=tuple(refs),
            reference_types=tuple(item.reference_types),
        ),
        None,
    )


def resolve_model_path(ref: str) -> str:
    """``zoo:<name>`` -> the built zoo directory (``pipelines.zoo.resolve_model``, imported only then);
    anything else (a local directory, a hub id) unchanged."""
    if isinstance(ref, str) and ref.startswith("zoo:"):
        from pipelines.zoo import resolve_model

        return resolve_model(ref)
    return ref


def _chunks(seq: list, size: int) -> Iterable[list]:
    for i in range(0, len(seq), max(1, size)):
        yield seq[i : i + size]


class _JudgeBase:
    """Shared driver: image checks, per-task batching, parsing and retries. Subclasses implement
    ``_generate(items, rubric, attempt, batch_index) -> list[str]`` and, for other answer formats (pairwise
    verdicts, :mod:`labelers.pairwise`), ``generate_structured(messages_list, schema, attempt, seed)``."""

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
        raise NotImplementedError

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
                for b, chunk in enumerate(_chunks(pending, self.batch_size)):
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


# ----------------------------------------------------------------------------------------------------------------
# transformers backend
# ----------------------------------------------------------------------------------------------------------------
def _make_grammar_processor(compiled_grammar: Any, batch_size: int, vocab_size: int, stop_token_ids: list[int]):
    """A ``transformers.LogitsProcessor`` with one xgrammar ``GrammarMatcher`` per sequence.

    Like ``xgrammar.contrib.hf.LogitsProcessor`` (single use, one per ``generate`` call), but a sequence whose
    matcher terminated (or rejected a token) is restricted to the stop tokens instead of keeping a stale mask,
    and a rejected token is recorded rather than asserted.
    """
    import torch
    import transformers
    import xgrammar as xgr

    class GrammarLogitsProcessor(transformers.LogitsProcessor):
        def __init__(self):
            self.matchers = [xgr.GrammarMatcher(compiled_grammar) for _ in range(batch_size)]
            self.bitmask = xgr.allocate_token_bitmask(batch_size, vocab_size)
            stop = torch.zeros(vocab_size, dtype=torch.bool)
            stop[[t for t in stop_token_ids if 0 <= t < vocab_size]] = True
            self._stop_row = self._pack(stop)
            self.rejected = [False] * batch_size
            self._started = False

        @staticmethod
        def _pack(allowed: torch.Tensor) -> torch.Tensor:
            n_words = (allowed.numel() + 31) // 32
            padded = torch.zeros(n_words * 32, dtype=torch.bool)
            padded[: allowed.numel()] = allowed
            bits = padded.view(n_words, 32).to(torch.int64) << torch.arange(32, dtype=torch.int64)
            packed = bits.sum(dim=1)
            return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            if input_ids.shape[0] != batch_size:
                raise RuntimeError(f"grammar processor built for batch {batch_size}, got {input_ids.shape[0]}")
            if self._started:
                last = input_ids[:, -1].tolist()
                for i, matcher in enumerate(self.matchers):
                    if not matcher.is_terminated() and not self.rejected[i]:
                        if not matcher.accept_token(int(last[i])):
                            self.rejected[i] = True
            self._started = True
            for i, matcher in enumerate(self.matchers):
                if matcher.is_terminated() or self.rejected[i]:
                    self.bitmask[i] = self._stop_row
                else:
                    matcher.fill_next_token_bitmask(self.bitmask, i)
            if scores.device.type == "cuda":
                xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device, non_blocking=True))
                return scores
            cpu = scores if scores.device.type == "cpu" else scores.to("cpu")
            if cpu.dtype != torch.float32:
                cpu = cpu.float()
                xgr.apply_token_bitmask_inplace(cpu, self.bitmask)
                return cpu.to(scores.device, scores.dtype)
            xgr.apply_token_bitmask_inplace(cpu, self.bitmask)
            return cpu if cpu is scores else cpu.to(scores.device)

    return GrammarLogitsProcessor()


def _shared_prefix(input_ids: Any, attention_mask: Any, stop_token_ids: Sequence[int],
                   mm_token_type_ids: Any | None = None) -> tuple[int, list[int]] | None:
    """``(P, pads)`` for a left-padded batch: ``P`` is the length of the longest run of text tokens every row starts
    with (the chat template's system message: rubric + schema), cut before the first image/video token and kept
    at least one token short of the shortest row; ``pads`` the left padding of each row. ``None`` when the batch
    is not cleanly left-padded. Pure (tensors in, ints out)."""
    import torch

    rows, width = int(input_ids.shape[0]), int(input_ids.shape[1])
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    lengths = attention_mask.sum(dim=1).tolist()
    pads = [width - int(n) for n in lengths]
    for i, pad in enumerate(pads):
        if int(attention_mask[i, pad:].sum()) != width - pad:  # a hole after the first real token
            return None
    limit = min(int(n) for n in lengths) - 1
    if limit <= 0:
        return None
    first = input_ids[0, pads[0] : pads[0] + limit]
    same = torch.ones(limit, dtype=torch.bool, device=input_ids.device)
    for i in range(1, rows):
        same &= input_ids[i, pads[i] : pads[i] + limit] == first
    if stop_token_ids:
        same &= ~torch.isin(first, torch.tensor(list(stop_token_ids), dtype=first.dtype, device=first.device))
    if mm_token_type_ids is not None:
        same &= mm_token_type_ids[0, pads[0] : pads[0] + limit] == 0
    bad = (~same).nonzero()
    prefix = int(bad[0, 0]) if len(bad) else limit
    return prefix, pads


_PREALLOCATED_LAYER: Any = None


def _preallocated_layer_class():
    """A transformers ``DynamicLayer`` whose keys/values are views into buffers with room to spare, so a decoding
    step writes its new key/value in place instead of re-concatenating the whole cache (``DynamicLayer`` copies
    every key and value of the prompt, per layer, per step: most of a padded batch's decoding time on CPU).
    ``PreallocatedLayer(keys, values, length)`` takes buffers of shape ``(batch, heads, capacity, head_dim)``
    whose first ``length`` positions are filled. A full buffer doubles; a base-class method that replaces the
    tensors (crop, reorder, reset) just makes the next update re-seat them. Defined on first use."""
    global _PREALLOCATED_LAYER
    if _PREALLOCATED_LAYER is None:
        from transformers.cache_utils import DynamicLayer

        class PreallocatedLayer(DynamicLayer):
            def __init__(self, keys, values, length: int):
                super().__init__()
                self.dtype, self.device = keys.dtype, keys.device
                self._k, self._v = keys, values
                self._view(int(length))
                self.is_initialized = True

            def _view(self, length: int) -> None:
                self.keys, self.values = self._k[..., :length, :], self._v[..., :length, :]
                self._keys_view = self.keys

            def update(self, key_states, value_states, *args, **kwargs):
                if self.keys is None:  # reset by the base class: plain concatenation from here on
                    return super().update(key_states, value_states, *args, **kwargs)
                n = self.keys.shape[-2]
                m = n + key_states.shape[-2]
                if self.keys is not self._keys_view or m > self._k.shape[-2]:
                    capacity = max(m, 2 * n)
                    k = self.keys.new_empty((*self.keys.shape[:-2], capacity, self.keys.shape[-1]))
                    v = self.values.new_empty((*self.values.shape[:-2], capacity, self.values.shape[-1]))
                    k[..., :n, :], v[..., :n, :] = self.keys, self.values
                    self._k, self._v = k, v
                self._k[..., n:m, :] = key_states
                self._v[..., n:m, :] = value_states
                self._view(m)
                return self.keys, self.values

        _PREALLOCATED_LAYER = PreallocatedLayer
    return _PREALLOCATED_LAYER


_CPU_GQA_ATTENTION = "prefmill_cpu_gqa_sdpa"


def _cpu_gqa_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):
    """transformers' ``sdpa`` attention, except that on CPU grouped-query attention runs through SDPA's
    ``enable_gqa`` instead of copying every key/value head ``num_key_value_groups`` times first (transformers only
    does that without a mask, i.e. never for a padded batch). Same kernel and arithmetic (outputs identical);
    the copy is a large part of decoding a padded batch against a long prompt on CPU. Anything unusual (other
    devices, dropout, position bias, paged cache, causal with a cache) goes to the stock function."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = query.shape[2] > 1 and attention_mask is None and causal
    if (groups <= 1 or query.device.type != "cpu" or dropout or kwargs.get("position_bias") is not None
            or kwargs.get("cache") is not None or kwargs.get("output_attentions")
            or (causal and key.shape[2] != query.shape[2]) or key.shape[-1] != value.shape[-1]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, is_causal=causal, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _use_cpu_gqa_attention(model: Any) -> bool:
    """Switch ``model``'s text decoder from ``sdpa`` to :func:`_cpu_gqa_sdpa_attention` (registered with
    transformers' attention and mask interfaces under ``prefmill_cpu_gqa_sdpa``). True when switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    text_config = model.config.get_text_config(decoder=True)
    if getattr(text_config, "_attn_implementation", None) != "sdpa":
        return False
    heads = getattr(text_config, "num_attention_heads", None)
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    if not heads or heads == kv_heads:
        return False
    AttentionInterface.register(_CPU_GQA_ATTENTION, _cpu_gqa_sdpa_attention)
    AttentionMaskInterface.register(_CPU_GQA_ATTENTION, sdpa_mask)
    key = next((name for name in getattr(model.config, "sub_configs", {}) or {}
                if getattr(model.config, name, None) is text_config), "")
    try:
        model.set_attn_implementation({key: _CPU_GQA_ATTENTION} if key else _CPU_GQA_ATTENTION)
    except (ValueError, KeyError, ImportError):
        return False
    return getattr(text_config, "_attn_implementation", None) == _CPU_GQA_ATTENTION


class TransformersJudge(_JudgeBase):
    """Local judge on transformers (any ``AutoModelForImageTextToText`` VLM with a chat template).

    ``model`` is ``zoo:judge``, a local directory or a hub id, loaded with ``from_pretrained``; ``model_ref`` (default ``model``)
    is what the judge id hashes — pass the profile's reference (``zoo:judge``, a hub id) so ids do not depend on
    where the weights live. Greedy decoding first (or sampling at ``temperature`` when it is > 0); retries sample at ``retry_temperature`` with a seed derived
    from ``seed``, the attempt and the batch index, so results are reproducible. ``cpu_threads`` sets torch's
    intra-op threads while generating (see :func:`torch_threads`; 1 for tiny models on a shared CPU).

    Two things keep batched generation cheap (issue 3, ``bench/judge.py``); neither changes what is generated
    beyond float rounding (greedy outputs are identical with and without them):

    * ``prefix_cache`` (default on): every chat of a task starts with the same system message (rubric + schema,
      most of the prompt). Its keys/values are computed once per distinct prefix (a small LRU) and handed to
      ``generate`` as the cache, left-padded per row, so prefill only runs the per-item tail (images, prompt).
      Without it a padded batch prefills the whole prompt under a padding mask, slower than item by item.
    * on CPU with the default attention, grouped-query attention goes through SDPA's ``enable_gqa`` instead of
      transformers' copy of every key/value head (:func:`_cpu_gqa_sdpa_attention`).
    """

    PREFIX_CACHE_SIZE = 16  # distinct prefixes kept (one per task's rubric, plus pairwise prompts)
    MIN_PREFIX_TOKENS = 32  # shorter shared prefixes are not worth a cache

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 8,
        max_new_tokens: int = 512,
        max_retries: int = 2,
        seed: int = 0,
        feedback_max_chars: int = FEEDBACK_MAX_CHARS,
        retry_temperature: float = 1.0,
        model_ref: str | None = None,
        rubric_dir: str | Path | None = None,
        attn_implementation: str | None = None,
        cpu_threads: int | None = None,
        temperature: float = 0.0,
        prefix_cache: bool = True,
    ):
        self.model_path = str(model)
        self.temperature = float(temperature)
        self.prefix_cache = bool(prefix_cache)
        self.model_ref = str(model_ref or model)
        self.device = device
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.max_retries = int(max_retries)
        self.seed = int(seed)
        self.feedback_max_chars = int(feedback_max_chars)
        self.retry_temperature = float(retry_temperature)
        self.rubric_dir = rubric_dir
        self.attn_implementation = attn_implementation
        self.cpu_threads = cpu_threads
        self.processor = None
        self.model = None
        self._compiler = None
        self._grammars: dict[str, Any] = {}
        self._prefix_kv: dict[tuple[int, ...], list] = {}  # shared prefix token ids -> [(keys, values)] per layer
        self._prefix_ok = False
        self._mm_token_ids: list[int] = []
        self.cpu_gqa_attention = False

    # -- lifecycle -------------------------------------------------------------------------------------------
    def setup(self) -> TransformersJudge:
        """Load processor, model and the grammar compiler (once; later calls are no-ops)."""
        if self.model is not None:
            return self
        from labelers import torch_compat

        torch_compat.install()
        import torch
        import xgrammar as xgr
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = resolve_model_path(self.model_path)
        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"
        kwargs: dict[str, Any] = {"dtype": getattr(torch, self.dtype)}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        self.model = AutoModelForImageTextToText.from_pretrained(path, **kwargs).to(self.device).eval()
        if not self.attn_implementation and torch.device(self.device).type == "cpu":
            self.cpu_gqa_attention = _use_cpu_gqa_attention(self.model)
        config = self.model.config
        self._mm_token_ids = sorted({int(t) for t in (getattr(config, n, None) for n in (
            "image_token_id", "video_token_id", "vision_start_token_id", "image_token_index", "video_token_index"))
            if isinstance(t, int)})
        text_config = config.get_text_config(decoder=True)
        self._prefix_ok = self.prefix_cache and not getattr(text_config, "use_sliding_window", False) and all(
            t == "full_attention" for t in (getattr(text_config, "layer_types", None) or ()))

        tokenizer = self.processor.tokenizer
        self._vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self._stop_ids = eos
        pad = self.model.generation_config.pad_token_id
        self._pad_id = pad if pad is not None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0])
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self._vocab_size, stop_token_ids=eos)
        self._compiler = xgr.GrammarCompiler(info, max_threads=max(1, min(8, torch.get_num_threads())))
        return self

    def teardown(self) -> None:
        self.model = None
        self.processor = None
        self._compiler = None
        self._grammars.clear()
        self._prefix_kv.clear()

    def compiled_grammar(self, rubric: Rubric):
        """The compiled grammar of ``rubric``'s judgement schema (cached)."""
        return self.compiled_schema(judgement_schema(rubric, self.feedback_max_chars))

    def compiled_schema(self, schema: dict):
        """xgrammar's compiled grammar of a JSON ``schema`` (no whitespace between tokens), cached by the schema's
        canonical JSON so every distinct schema is compiled once per judge."""
        if self._compiler is None:
            raise RuntimeError("TransformersJudge.setup() was not called")
        key = schema_key(schema)
        if key not in self._grammars:
            self._grammars[key] = self._compiler.compile_json_schema(schema, any_whitespace=False)
        return self._grammars[key]

    # -- generation ------------------------------------------------------------------------------------------
    def _generate(self, items: list[JudgeItem], rubric: Rubric, attempt: int, batch_index: int) -> list[str]:
        messages = [build_messages(it, rubric, self.feedback_max_chars) for it in items]
        schema = judgement_schema(rubric, self.feedback_max_chars)
        return self.generate_structured(messages, schema, attempt=attempt, seed=batch_index)

    def generate_structured(self, messages_list: list[list[dict]], schema: dict, attempt: int = 0,
                            seed: int = 0) -> list[str]:
        """Generate one answer per chat in ``messages_list``, each constrained to the JSON ``schema``.

        Messages are in the :func:`build_messages` format (``{"type": "image", "image": PIL}`` parts holding
        decoded RGB images). The schema is compiled with xgrammar once per distinct schema and cached. Chats are
        generated in chunks of ``batch_size`` (left padding, one grammar matcher per sequence). Attempt 0 decodes
        greedily (or samples at ``temperature`` when it is > 0); ``attempt > 0`` samples at ``retry_temperature``.
        Chunk ``k`` is seeded with ``self.seed + 1_000_003 * attempt + seed + k`` under a forked RNG, so outputs are
        reproducible and the caller's RNG is untouched; the pointwise driver passes its batch index as ``seed``.
        Returns the decoded texts (special tokens removed), one per chat, in input order.
        """
        if self.model is None:
            raise RuntimeError("TransformersJudge.setup() was not called")
        outputs: list[str] = []
        for k, chunk in enumerate(_chunks(list(messages_list), self.batch_size)):
            outputs += self._generate_chunk(chunk, schema, attempt, int(seed) + k)
        return outputs

    def _generate_chunk(self, messages_list: list[list[dict]], schema: dict, attempt: int, seed: int) -> list[str]:
        import torch
        from transformers import LogitsProcessorList

        texts = [self.processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                 for m in messages_list]
        images = [img for m in messages_list for img in message_images(m)]
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        processor = _make_grammar_processor(self.compiled_schema(schema), len(messages_list), self._vocab_size,
                                            self._stop_ids)
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "logits_processor": LogitsProcessorList([processor]),
            "eos_token_id": self._stop_ids,
            "pad_token_id": self._pad_id,
        }
        if attempt == 0 and self.temperature <= 0:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        elif attempt == 0:
            gen_kwargs.update(do_sample=True, temperature=self.temperature, top_p=1.0, top_k=0)
        else:
            gen_kwargs.update(do_sample=True, temperature=self.retry_temperature, top_p=1.0, top_k=0)
        devices = [torch.device(self.device).index or 0] if str(self.device).startswith("cuda") else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices), torch_threads(self.cpu_threads):
            capacity = int(inputs["input_ids"].shape[1]) + self.max_new_tokens
            past = self._prefix_past(inputs, capacity) if self._prefix_ok else None
            torch.manual_seed(self.seed + 1_000_003 * attempt + seed)
            if past is None:
                out = self.model.generate(**inputs, **gen_kwargs)
            else:
                try:
                    out = self.model.generate(**inputs, past_key_values=past, **gen_kwargs)
                except Exception as e:  # noqa: BLE001 - a model the prefix cache does not suit: generate as before
                    self._disable_prefix_cache(e)
                    gen_kwargs["logits_processor"] = LogitsProcessorList([_make_grammar_processor(
                        self.compiled_schema(schema), len(messages_list), self._vocab_size, self._stop_ids)])
                    torch.manual_seed(self.seed + 1_000_003 * attempt + seed)
                    out = self.model.generate(**inputs, **gen_kwargs)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        return self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    # -- shared-prefix cache ---------------------------------------------------------------------------------
    def _reset_rope_state(self) -> None:
        """Forget the position offsets Qwen2-VL-style models keep from their last prefill (``rope_deltas``), so
        ``generate`` recomputes them for the whole prompt when it starts from a cache."""
        for module in (self.model, getattr(self.model, "model", None)):
            if module is not None and getattr(module, "rope_deltas", None) is not None:
                module.rope_deltas = None

    def _disable_prefix_cache(self, error: BaseException) -> None:
        import warnings

        warnings.warn(f"TransformersJudge: prefix cache disabled for {self.model_path} "
                      f"({type(error).__name__}: {error})", RuntimeWarning, stacklevel=3)
        self._prefix_ok = False
        self._prefix_kv.clear()
        self._reset_rope_state()

    def _prefix_past(self, inputs: Any, capacity: int):
        """A ``DynamicCache`` holding the keys/values of the batch's shared prefix, laid out as the left-padded
        batch has it (zeros under the padding, which the attention mask hides), in buffers with room for
        ``capacity`` positions; ``None`` when no shared prefix is worth it."""
        import torch
        from transformers import DynamicCache

        found = _shared_prefix(inputs["input_ids"], inputs.get("attention_mask"), self._mm_token_ids,
                               inputs.get("mm_token_type_ids"))
        if found is None or found[0] < self.MIN_PREFIX_TOKENS:
            return None
        length, pads = found
        row = pads.index(min(pads))
        ids = inputs["input_ids"][row, pads[row] : pads[row] + length]
        key = tuple(ids.tolist())
        kv = self._prefix_kv.pop(key, None)
        if kv is None:
            try:
                self._reset_rope_state()
                cache = self.model(input_ids=ids[None], use_cache=True).past_key_values
                kv = [(layer.keys, layer.values) for layer in cache.layers]
            except Exception as e:  # noqa: BLE001 - same fallback as in _generate_chunk
                self._disable_prefix_cache(e)
                return None
        self._prefix_kv[key] = kv  # most recently used last
        while len(self._prefix_kv) > self.PREFIX_CACHE_SIZE:
            self._prefix_kv.pop(next(iter(self._prefix_kv)))
        columns = length + min(pads)  # cached columns of the padded batch: padding, then (part of) the prefix
        layer_class = _preallocated_layer_class()
        layers = []
        for k, v in kv:
            keys = k.new_zeros((len(pads), k.shape[1], max(capacity, columns), k.shape[3]))
            values = v.new_zeros((len(pads), v.shape[1], max(capacity, columns), v.shape[3]))
            for i, pad in enumerate(pads):
                pad = min(pad, columns)
                keys[i, :, pad:columns] = k[0, :, : columns - pad]
                values[i, :, pad:columns] = v[0, :, : columns - pad]
            layers.append(layer_class(keys, values, columns))
        cache = DynamicCache()
        cache.layers = layers
        self._reset_rope_state()
        return cache


# ----------------------------------------------------------------------------------------------------------------
# vLLM backend (GPU extra)
# ----------------------------------------------------------------------------------------------------------------
def build_vllm_requests(items: Sequence[JudgeItem], rubric: Rubric, processor: Any,
                        feedback_max_chars: int = FEEDBACK_MAX_CHARS) -> list[dict]:
    """vLLM offline prompts for ``items`` (already image-checked): ``{"prompt": str, "multi_modal_data":
    {"image": PIL | [PIL, ...]}}``, the prompt rendered with ``processor``'s chat template. Pure (no vllm)."""
    return vllm_requests_from_messages([build_messages(it, rubric, feedback_max_chars) for it in items], processor)


def vllm_requests_from_messages(messages_list: Sequence[list[dict]], processor: Any) -> list[dict]:
    """vLLM offline prompts for chats in the :func:`build_messages` format (images inline as PIL parts). Pure."""
    requests = []
    for messages in messages_list:
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images = message_images(messages)
        request: dict[str, Any] = {"prompt": prompt}
        if images:
            request["multi_modal_data"] = {"image": images[0] if len(images) == 1 else images}
        requests.append(request)
    return requests


def vllm_structured_sampling_params(schema: dict, *, max_tokens: int, temperature: float = 0.0,
                                    seed: int | None = None):
    """``vllm.SamplingParams`` constrained to ``schema``: ``StructuredOutputsParams`` (vLLM >= 0.11), falling
    back to ``GuidedDecodingParams`` on older releases."""
    from vllm import SamplingParams

    common = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:  # vLLM < 0.11
        from vllm.sampling_params import GuidedDecodingParams

        return SamplingParams(guided_decoding=GuidedDecodingParams(json=schema), **common)
    return SamplingParams(structured_outputs=StructuredOutputsParams(json=schema), **common)


class VllmJudge(_JudgeBase):
    """Judge on vLLM's offline engine: structured JSON output, prefix caching (the rubric + schema system
    message is shared by every request of a task), tensor/data parallel. ``import vllm`` happens in ``setup``.

    ``data_parallel_size > 1`` is passed through to the engine; with vLLM's offline ``LLM`` that needs the
    usual multi-process launch (one process per DP rank) — on one node prefer tensor parallel, or run one
    partition per GPU with the Dagster ``gpu`` pool.
    """

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int = 8192,
        batch_size: int = 64,
        max_new_tokens: int = 512,
        enable_prefix_caching: bool = True,
        max_retries: int = 2,
        seed: int = 0,
        feedback_max_chars: int = FEEDBACK_MAX_CHARS,
        retry_temperature: float = 1.0,
        max_images_per_prompt: int = 8,
        dtype: str = "auto",
        model_ref: str | None = None,
        rubric_dir: str | Path | None = None,
        engine_kwargs: dict | None = None,
    ):
        self.model_path = str(model)
        self.model_ref = str(model_ref or model)
        self.tensor_parallel_size = int(tensor_parallel_size)
        self.data_parallel_size = int(data_parallel_size)
        self.gpu_memory_utilization = float(gpu_memory_utilization)
        self.max_model_len = int(max_model_len)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.max_retries = int(max_retries)
        self.seed = int(seed)
        self.feedback_max_chars = int(feedback_max_chars)
        self.retry_temperature = float(retry_temperature)
        self.max_images_per_prompt = int(max_images_per_prompt)
        self.dtype = dtype
        self.rubric_dir = rubric_dir
        self.engine_kwargs = dict(engine_kwargs or {})
        self.llm = None
        self.processor = None

    def engine_args(self) -> dict:
        args = {
            "model": self.model_path,
            "tensor_parallel_size": self.tensor_parallel_size,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_model_len": self.max_model_len,
            "enable_prefix_caching": self.enable_prefix_caching,
            "limit_mm_per_prompt": {"image": self.max_images_per_prompt},
            "dtype": self.dtype,
            "seed": self.seed,
        }
        if self.data_parallel_size > 1:
            args["data_parallel_size"] = self.data_parallel_size
        args.update(self.engine_kwargs)
        return args

    def setup(self) -> VllmJudge:
        if self.llm is not None:
            return self
        import vllm
        from transformers import AutoProcessor

        self.model_path = resolve_model_path(self.model_path)
        self.processor = AutoProcessor.from_pretrained(self.model_path)
        self.llm = vllm.LLM(**self.engine_args())
        return self

    def teardown(self) -> None:
        self.llm = None
        self.processor = None

    def _generate(self, items: list[JudgeItem], rubric: Rubric, attempt: int, batch_index: int) -> list[str]:
        messages = [build_messages(it, rubric, self.feedback_max_chars) for it in items]
        schema = judgement_schema(rubric, self.feedback_max_chars)
        return self.generate_structured(messages, schema, attempt=attempt, seed=batch_index)

    def generate_structured(self, messages_list: list[list[dict]], schema: dict, attempt: int = 0,
                            seed: int = 0) -> list[str]:
        """One answer per chat, constrained to the JSON ``schema`` by vLLM's structured outputs; all chats go
        to the engine in one ``generate`` call (it batches and shares cached prefixes itself). Greedy at attempt
        0; ``attempt > 0`` samples at ``retry_temperature`` with seed ``self.seed + 1_000_003 * attempt + seed``."""
        if self.llm is None:
            raise RuntimeError("VllmJudge.setup() was not called")
        requests = vllm_requests_from_messages(list(messages_list), self.processor)
        if not requests:
            return []
        params = vllm_structured_sampling_params(
            schema,
            max_tokens=self.max_new_tokens,
            temperature=0.0 if attempt == 0 else self.retry_temperature,
            seed=None if attempt == 0 else self.seed + 1_000_003 * attempt + int(seed),
        )
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [out.outputs[0].text if out.outputs else "" for out in outputs]


JUDGE_BACKENDS = {"transformers": TransformersJudge, "vllm": VllmJudge}
