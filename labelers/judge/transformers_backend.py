"""The transformers judge backend: ``AutoProcessor`` + ``AutoModelForImageTextToText`` loaded once in ``setup()``;
batched generation with left padding and grammar-constrained decoding through xgrammar (a per-sequence
``GrammarMatcher`` applied as a logits processor), so even a random model produces schema-valid JSON.

:meth:`TransformersJudge.generate_tokens` is the one generation loop: the judge's ``generate_structured`` and the
OpenAI-compatible server (:mod:`labelers.judge_server`) both run on it. What keeps it cheap lives in
:mod:`labelers.judge.speedups`. Heavy imports (torch, transformers, xgrammar) happen inside functions.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from labelers.judge.protocol import FEEDBACK_MAX_CHARS, judgement_schema, message_images, schema_key
from labelers.judge.retry import JudgeBase, chunks
from labelers.judge.speedups import PrefixCache, use_cpu_gqa_attention
from labelers.rubrics import Rubric
from labelers.torch_compat import torch_threads


def make_grammar_processor(compiled_grammar: Any, batch_size: int, vocab_size: int, stop_token_ids: list[int]):
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


class TransformersJudge(JudgeBase):
    """Local judge on transformers (any ``AutoModelForImageTextToText`` VLM with a chat template).

    ``model`` is ``zoo:judge``, a local directory or a hub id, loaded with ``from_pretrained``; ``model_ref``
    (default ``model``) is what the judge id hashes — pass the profile's reference (``zoo:judge``, a hub id) so
    ids do not depend on where the weights live. Greedy decoding first (or sampling at ``temperature`` when it is
    > 0); retries sample at ``retry_temperature`` with a seed derived from ``seed``, the attempt and the batch
    index, so results are reproducible. ``cpu_threads`` sets torch's intra-op threads while generating (see
    :func:`torch_threads`; 1 for tiny models on a shared CPU).

    The speed-ups of :mod:`labelers.judge.speedups` (``prefix_cache``, ``preallocated_cache``, ``gqa_attention``;
    all on by default) change what is computed, not what is generated; ``stats`` counts their work
    (``prefix_*``, ``preallocated_*``), ``cpu_gqa_attention`` says whether the attention override is on.
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
        preallocated_cache: bool = True,
        gqa_attention: bool = True,
    ):
        self.model_path = str(model)
        self.temperature = float(temperature)
        self.prefix_cache = bool(prefix_cache)
        self.preallocated_cache = bool(preallocated_cache)
        self.gqa_attention = bool(gqa_attention)
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
        self.grammar_compiler = None
        self.stats: Counter = Counter()
        self._grammars: dict[str, Any] = {}
        self._prefix: PrefixCache | None = None
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

        from pipelines.zoo import resolve_model  # the one model-reference resolver

        path = resolve_model(self.model_path)
        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"
        kwargs: dict[str, Any] = {"dtype": getattr(torch, self.dtype)}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        self.model = AutoModelForImageTextToText.from_pretrained(path, **kwargs).to(self.device).eval()
        if self.gqa_attention and not self.attn_implementation and torch.device(self.device).type == "cpu":
            self.cpu_gqa_attention = use_cpu_gqa_attention(self.model)
        config = self.model.config
        self._mm_token_ids = sorted({int(t) for t in (getattr(config, n, None) for n in (
            "image_token_id", "video_token_id", "vision_start_token_id", "image_token_index", "video_token_index"))
            if isinstance(t, int)})
        text_config = config.get_text_config(decoder=True)
        full_attention = not getattr(text_config, "use_sliding_window", False) and all(
            t == "full_attention" for t in (getattr(text_config, "layer_types", None) or ()))
        if self.prefix_cache and full_attention:  # a sliding window would need a sliding prefix cache
            self._prefix = PrefixCache(self.PREFIX_CACHE_SIZE, self.MIN_PREFIX_TOKENS, self.preallocated_cache,
                                       self.stats)

        tokenizer = self.processor.tokenizer
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.stop_ids = eos
        pad = self.model.generation_config.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                                   else eos[0])
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size, stop_token_ids=eos)
        self.grammar_compiler = xgr.GrammarCompiler(info, max_threads=max(1, min(8, torch.get_num_threads())))
        return self

    @property
    def prefix_cache_active(self) -> bool:
        """Whether the shared-prefix cache is on (asked for, and the model has full attention in every layer)."""
        return self._prefix is not None

    # the names the tests and the server used before the split
    _stop_ids = property(lambda self: self.stop_ids)
    _pad_id = property(lambda self: self.pad_id)
    _vocab_size = property(lambda self: self.vocab_size)

    def teardown(self) -> None:
        self.model = None
        self.processor = None
        self.grammar_compiler = None
        self._grammars.clear()
        if self._prefix is not None:
            self._prefix.clear()
        self._prefix = None

    # -- grammars --------------------------------------------------------------------------------------------
    def compiled_grammar(self, rubric: Rubric):
        """The compiled grammar of ``rubric``'s judgement schema (cached)."""
        return self.compiled_schema(judgement_schema(rubric, self.feedback_max_chars))

    def compiled_schema(self, schema: dict):
        """xgrammar's compiled grammar of a JSON ``schema`` (no whitespace between tokens), cached by the schema's
        canonical JSON so every distinct schema is compiled once per judge."""
        if self.grammar_compiler is None:
            raise RuntimeError("TransformersJudge.setup() was not called")
        key = schema_key(schema)
        if key not in self._grammars:
            self._grammars[key] = self.grammar_compiler.compile_json_schema(schema, any_whitespace=False)
        return self._grammars[key]

    def compiled_json_object(self):
        """xgrammar's built-in grammar of any JSON object (cached)."""
        if self.grammar_compiler is None:
            raise RuntimeError("TransformersJudge.setup() was not called")
        if "<json_object>" not in self._grammars:
            self._grammars["<json_object>"] = self.grammar_compiler.compile_builtin_json_grammar()
        return self._grammars["<json_object>"]

    # -- generation ------------------------------------------------------------------------------------------
    def generate_structured(self, messages_list: list[list[dict]], schema: dict, attempt: int = 0,
                            seed: int = 0) -> list[str]:
        """Generate one answer per chat in ``messages_list``, each constrained to the JSON ``schema``.

        Messages are in the :func:`~labelers.judge.protocol.build_messages` format (``{"type": "image", "image":
        PIL}`` parts holding decoded RGB images). The schema is compiled with xgrammar once per distinct schema and
        cached. Chats are generated in chunks of ``batch_size`` (left padding, one grammar matcher per sequence).
        Attempt 0 decodes greedily (or samples at ``temperature`` when it is > 0); ``attempt > 0`` samples at
        ``retry_temperature``. Chunk ``k`` is seeded with ``self.seed + 1_000_003 * attempt + seed + k`` under a
        forked RNG, so outputs are reproducible and the caller's RNG is untouched; the pointwise driver passes its
        batch index as ``seed``. Returns the decoded texts (special tokens removed), one per chat, in input order.
        """
        if self.model is None:
            raise RuntimeError("TransformersJudge.setup() was not called")
        grammar = self.compiled_schema(schema)
        temperature = self.temperature if attempt == 0 else self.retry_temperature
        outputs: list[str] = []
        for k, chunk in enumerate(chunks(list(messages_list), self.batch_size)):
            new_tokens, _ = self.generate_tokens(chunk, grammar, max_new_tokens=self.max_new_tokens,
                                                 temperature=temperature,
                                                 seed=self.seed + 1_000_003 * attempt + int(seed) + k)
            outputs += self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return outputs

    def generate_tokens(self, messages_list: list[list[dict]], grammar: Any = None, *, max_new_tokens: int,
                        temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> tuple[Any, list[int]]:
        """One ``generate`` call over ``messages_list`` (one batch, left padded): greedy when ``temperature`` <= 0,
        else sampling at ``temperature`` / ``top_p`` seeded with ``seed`` under a forked RNG. ``grammar`` (an
        xgrammar compiled grammar, or ``None`` for free text) constrains every row. Returns the new token ids
        (a ``(rows, steps)`` tensor, stop and padding tokens included) and each row's prompt length."""
        import torch
        from transformers import LogitsProcessorList

        if self.model is None:
            raise RuntimeError("TransformersJudge.setup() was not called")
        texts = [self.processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                 for m in messages_list]
        images = [img for m in messages_list for img in message_images(m)]
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "eos_token_id": self.stop_ids,
                                      "pad_token_id": self.pad_id}
        if grammar is not None:
            gen_kwargs["logits_processor"] = LogitsProcessorList([make_grammar_processor(
                grammar, len(messages_list), self.vocab_size, self.stop_ids)])
        if temperature <= 0:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        devices = [torch.device(self.device).index or 0] if str(self.device).startswith("cuda") else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices), torch_threads(self.cpu_threads):
            if self._prefix is not None:
                capacity = int(inputs["input_ids"].shape[1]) + max_new_tokens
                past = self._prefix.past_for(self.model, inputs, capacity, self._mm_token_ids)
                if past is not None:
                    gen_kwargs["past_key_values"] = past
            torch.manual_seed(int(seed))
            out = self.model.generate(**inputs, **gen_kwargs)
        prompt_lengths = [int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()]
        return out[:, inputs["input_ids"].shape[1] :], prompt_lengths
