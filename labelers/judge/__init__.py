"""VLM judges: score an image on a task's rubric dimensions (0–5 each) with one sentence of feedback per dimension.

The package, one concern a module:

* :mod:`~labelers.judge.protocol`: data types and statuses, the answer models (one per rubric; each gives the
  JSON schema the backends decode under *and* validates answers), the chat messages.
* :mod:`~labelers.judge.safejson`: bounded decoding of untrusted answers (every failure a parse error).
* :mod:`~labelers.judge.inputs`: decoding an item's images, resolving ``zoo:`` model references.
* :mod:`~labelers.judge.retry`: :class:`JudgeBase`, the driver every backend shares (image checks, per-task
  batching, parsing, retries; a bad answer ends as ``parse_error``, never a silent score).
* :mod:`~labelers.judge.transformers_backend`: :class:`TransformersJudge` (local, batched, xgrammar-constrained),
  with its speed-ups in :mod:`~labelers.judge.speedups`.
* :mod:`~labelers.judge.vllm_backend`: :class:`VllmJudge` (GPU extra).

Every backend exposes ``generate_structured(messages_list, schema, attempt, seed)``: raw answers to arbitrary
chats under an arbitrary JSON schema (the pairwise judge, :mod:`labelers.pairwise`, uses it). Heavy imports
(torch, transformers, xgrammar, vllm) happen inside functions. The names below are re-exported for callers
that import from ``labelers.judge``.
"""

from labelers.judge.inputs import load_conditioning, load_image, prepare_item
from labelers.judge.protocol import (
    FEEDBACK_MAX_CHARS,
    SCORE_TYPE,
    STATUS_IMAGE_ERROR,
    STATUS_OK,
    STATUS_PARSE_ERROR,
    STATUS_REWARD_ERROR,
    STATUSES,
    ChoiceField,
    IntegerField,
    JudgeItem,
    JudgeResult,
    ObjectModel,
    TextField,
    build_messages,
    clean_text,
    feedback_pattern,
    image_part,
    judge_id,
    judgement_model,
    judgement_schema,
    message_images,
    parse_judgement,
    reference_parts,
    schema_key,
    system_prompt,
    text_part,
)
from labelers.judge.retry import JudgeBase
from labelers.judge.safejson import (
    MAX_ANSWER_CHARS,
    MAX_JSON_DEPTH,
    MAX_NUMBER_CHARS,
    BadAnswer,
    JudgementParseError,
    answer_text,
    decode_json_object,
    guarded_json_loads,
    json_depth_exceeds,
    safe_parse,
)
from labelers.judge.transformers_backend import TransformersJudge, make_grammar_processor
from labelers.judge.vllm_backend import (
    VllmJudge,
    build_vllm_requests,
    vllm_requests_from_messages,
    vllm_structured_sampling_params,
)

# Names from before the split into modules, still imported by tests.
_JudgeBase = JudgeBase
_make_grammar_processor = make_grammar_processor

JUDGE_BACKENDS = {"transformers": TransformersJudge, "vllm": VllmJudge}
