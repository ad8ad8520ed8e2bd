"""The vLLM judge backend (GPU extra): vLLM's offline engine with structured JSON output and prefix caching.

The request builders (:func:`build_vllm_requests`, :func:`vllm_requests_from_messages`) are pure and need no
vLLM; ``import vllm`` happens in :meth:`VllmJudge.setup` and :func:`vllm_structured_sampling_params`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from labelers.judge.protocol import FEEDBACK_MAX_CHARS, JudgeItem, build_messages, message_images
from labelers.judge.retry import JudgeBase
from labelers.rubrics import Rubric


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


class VllmJudge(JudgeBase):
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

        from pipelines.zoo import resolve_model  # the one model-reference resolver

        self.model_path = resolve_model(self.model_path)
        self.processor = AutoProcessor.from_pretrained(self.model_path)
        self.llm = vllm.LLM(**self.engine_args())
        return self

    def teardown(self) -> None:
        self.llm = None
        self.processor = None

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
