"""Judge through an OpenAI-compatible chat-completions endpoint (a vLLM server, :mod:`labelers.judge_server`, or a
hosted model).

:class:`OpenAIJudge` is a :class:`labelers.judge.retry.JudgeBase` backend: the shared driver does image checks, per-task
batching, parsing and parse retries; this module turns each batch into one ``POST {base_url}/chat/completions``
per item, sent concurrently (``openai.AsyncOpenAI``, at most ``max_concurrency`` in flight) from sync code.

Requests carry ``model``, ``messages`` (the :func:`labelers.judge.build_messages` prompt with its images as PNG
``data:`` URLs in ``image_url`` parts), ``max_tokens``, ``temperature``, ``seed`` and
``response_format={"type": "json_schema", "json_schema": {"name": ..., "schema": ..., "strict": True}}`` (the
judgement schema of the task's rubric), so a server with structured outputs (vLLM, our judge server) returns
schema-valid JSON; :func:`labelers.judge.parse_judgement` still validates every answer.

Transport errors: 429 and 5xx answers, connection errors and timeouts are retried (``max_attempts`` in all) with
exponential backoff and jitter, or after the server's ``Retry-After`` / ``retry-after-ms`` when it sends one.
Any other 4xx fails at once with :class:`OpenAIHTTPError` naming the status and the server's message. The client
itself is built with ``max_retries=0``: the retries are this module's (tenacity), not the ``openai`` package's,
which retries 408/409 too, waits at least ~0.5 s where a server says ``Retry-After: 0``, gives up at once on a
``Retry-After`` over two minutes, and keeps no count of attempts. Each attempt is bounded by ``timeout_s`` (the
client's timeout, and an overall ``asyncio.wait_for``).

Bad answers: a 2xx answer for one item that is not a chat completion (a body that is not JSON, nested absurdly
deep, with numbers Python will not convert, without ``choices[0].message``) is that item's answer, unreadable: it
goes to the driver as a :class:`labelers.judge.BadAnswer`, so the item is retried under the driver's
``max_retries`` and then ``parse_error`` with the reason, like any answer that fails to parse; the other items
of the batch are unaffected. (``list_models`` raises :class:`MalformedAnswerError` instead.)

The API key
-----------
The key goes into the ``Authorization: Bearer`` header and nowhere else: it is held in a
:class:`pydantic.SecretStr` (``repr`` ``SecretStr('**********')``) and handed to an ``openai.AsyncOpenAI`` that
lives for one call (no key: no ``Authorization`` header, and ``OPENAI_API_KEY`` is never read); it is not in
``repr(judge)``, in log records, or in the messages of the errors this module raises (a server message that
echoes it is redacted too). Under Dagster, ``pipelines.resources.JudgeResource`` passes it in from the environment
with ``dagster.EnvVar("PREFMILL_JUDGE_API_KEY")`` (Dagster then keeps it out of run config and the UI); profiles
never contain it. This module does not import Dagster.

One module (over ~500 lines) on purpose: the request building, the retry policy and the hostile-body decoding of one backend are read and changed together.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import email.utils
import io
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr

from labelers.judge.protocol import FEEDBACK_MAX_CHARS, JudgeItem, build_messages, judgement_schema
from labelers.judge.retry import JudgeBase
from labelers.judge.safejson import BadAnswer, json_depth_exceeds
from labelers.rubrics import Rubric

log = logging.getLogger(__name__)

#: Retry-After values above this are capped (a misconfigured server should not park a run for hours).
MAX_RETRY_AFTER_S = 300.0
#: Bounds on one HTTP answer's JSON body (a chat completion is a few kB, five levels deep).
MAX_BODY_CHARS = 16 * 1024 * 1024
MAX_BODY_DEPTH = 64


class OpenAIJudgeError(RuntimeError):
    """The endpoint gave no usable answer: retries exhausted, or (subclasses) an HTTP error that is not retried, a
    malformed 2xx answer (:class:`MalformedAnswerError`; for a chat completion, that item's parse error)."""


class OpenAIHTTPError(OpenAIJudgeError):
    """A non-retryable HTTP answer (4xx other than 429). ``status`` and ``server_message`` are kept for callers."""

    def __init__(self, message: str, status: int, server_message: str):
        super().__init__(message)
        self.status = status
        self.server_message = server_message


class MalformedAnswerError(OpenAIJudgeError):
    """A 2xx answer that is not what the endpoint should send (body not JSON, absurdly nested, not an object, no
    ``choices[0].message``). For a chat completion the driver turns it into the item's ``parse_error``."""

    def __init__(self, message: str, raw: str = ""):
        super().__init__(message)
        self.reason = message
        self.raw = raw


class _Retryable(Exception):
    """Internal: a failed attempt worth retrying (429, 5xx, connection error, timeout)."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------------------
def safe_url(url: str) -> str:
    """``url`` without user info (``https://user:pass@host`` -> ``https://host``), for messages and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def retry_after_seconds(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (OpenAI) or ``Retry-After`` (seconds or an HTTP date); ``None``
    when absent or unreadable. Negative values read as 0; large ones are capped at :data:`MAX_RETRY_AFTER_S`."""
    value: float | None = None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = None
    if value is None:
        ra = headers.get("retry-after")
        if ra is None:
            return None
        ra = ra.strip()
        try:
            value = float(ra)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(ra)
            except (TypeError, ValueError, IndexError):
                return None
            if when is None:
                return None
            value = when.timestamp() - (time.time() if now is None else now)
    if value != value:  # NaN
        return None
    return min(max(value, 0.0), MAX_RETRY_AFTER_S)


def server_message(response: Any, limit: int = 500) -> str:
    """The error text of an OpenAI-style answer (``{"error": {"message": ...}}``, ``{"detail": ...}``, ``{"message":
    ...}``) or the start of its body."""
    text = ""
    try:
        data = response.json()
    except Exception:  # noqa: BLE001 - not JSON: fall back to the body text
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            text = str(err["message"])
        elif isinstance(err, str):
            text = err
        elif data.get("detail"):
            text = str(data["detail"])
        elif data.get("message"):
            text = str(data["message"])
    if not text:
        try:
            text = response.text
        except Exception:  # noqa: BLE001
            text = ""
    text = " ".join(str(text).split())
    return (text[:limit] + "...") if len(text) > limit else (text or "(empty body)")


def image_data_url(image: Any) -> str:
    """A ``data:image/png;base64,...`` URL of ``image`` (PIL image, encoded bytes, a path, or already a data URL)."""
    from PIL import Image

    if isinstance(image, str) and image.startswith("data:"):
        return image
    if image is None:
        raise ValueError("image is None")
    if isinstance(image, (bytes, bytearray)):
        with Image.open(io.BytesIO(image)) as im:
            return image_data_url(im.convert("RGB"))
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return image_data_url(im.convert("RGB"))
    if not isinstance(image, Image.Image):
        raise TypeError(f"unsupported image type {type(image).__name__}")
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # fast; the bytes go over localhost/LAN far more than WAN
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_openai_messages(messages: Sequence[dict]) -> list[dict]:
    """Chat messages in :func:`labelers.judge.build_messages` form (``{"type": "image", "image": PIL}`` parts) ->
    OpenAI's: images become ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``;
    ``image_url`` and text parts pass through; a content list of text parts only becomes one string (what every
    server accepts for a system message)."""
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type")
                if kind == "image" or (kind is None and "image" in part):
                    try:
                        url = image_data_url(part.get("image"))
                    except (ValueError, TypeError, OSError) as e:
                        raise ValueError(f"message {i} part {j}: {e}") from None
                    parts.append({"type": "image_url", "image_url": {"url": url}})
                elif kind == "text":
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                else:
                    parts.append(dict(part))
            if all(p["type"] == "text" for p in parts):
                content = "".join(p["text"] for p in parts)
            else:
                content = parts
        new = {k: v for k, v in message.items() if k != "content"}
        new["content"] = content
        out.append(new)
    return out


def _token_count(value: Any) -> int:
    """A ``usage`` token count as an int: 0 unless it is a finite, non-negative, not absurdly large number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    if value != value or not 0 <= value < 2**53:  # NaN, ±inf, negative, absurdly large
        return 0
    return int(value)


_NAME_RE = re.compile(r"[^A-Za-z0-9_-]+")


def schema_name(schema: dict, default: str = "response") -> str:
    """A ``json_schema.name`` for ``schema`` (its ``title``, reduced to ``[A-Za-z0-9_-]``, at most 64 chars)."""
    name = _NAME_RE.sub("_", str(schema.get("title") or "")).strip("_")[:64]
    return name or default


# ----------------------------------------------------------------------------------------------------------------
# The judge
# ----------------------------------------------------------------------------------------------------------------
class OpenAIJudge(JudgeBase):
    """Judge on an OpenAI-compatible ``/chat/completions`` endpoint.

    ``model`` is the served model name; ``base_url`` ends before ``/chat/completions`` (``http://host:8000/v1``);
    ``model_ref`` (default ``model``) is what the judge id hashes. One request per item, at most
    ``max_concurrency`` in flight, each bounded by ``timeout_s`` and tried up to ``max_attempts`` times on 429 /
    5xx / connection errors / timeouts (backoff ``backoff_s * 2**k`` + jitter, at most ``max_backoff_s``, or the
    server's ``Retry-After``). Greedy first (or ``temperature``); a parse retry (the driver's ``max_retries``)
    samples at ``retry_temperature`` with seed ``seed + 1_000_003 * attempt + batch_index``.

    Counters (cumulative over the object's life): ``requests_sent`` (HTTP attempts), ``retries`` (attempts that
    were retried), ``prompt_tokens`` / ``completion_tokens`` (from the answers' ``usage``).
    """

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key: str | SecretStr | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        max_attempts: int = 5,
        batch_size: int = 32,
        max_new_tokens: int = 512,
        max_retries: int = 2,
        seed: int = 0,
        temperature: float = 0.0,
        feedback_max_chars: int = FEEDBACK_MAX_CHARS,
        model_ref: str | None = None,
        rubric_dir: str | Path | None = None,
        retry_temperature: float = 1.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ):
        if not model:
            raise ValueError("OpenAIJudge: model (the served model name) is required")
        if not base_url or not str(base_url).startswith(("http://", "https://")):
            raise ValueError(f"OpenAIJudge: base_url must be an http(s) URL, got {safe_url(str(base_url))!r}")
        if int(max_concurrency) < 1 or int(max_attempts) < 1:
            raise ValueError("OpenAIJudge: max_concurrency and max_attempts must be >= 1")
        self.model = str(model)
        self.base_url = str(base_url).rstrip("/")
        if isinstance(api_key, SecretStr):
            api_key = api_key.get_secret_value()
        self._api_key = SecretStr(api_key) if api_key else None
        self.max_concurrency = int(max_concurrency)
        self.timeout_s = float(timeout_s)
        self.max_attempts = int(max_attempts)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.max_retries = int(max_retries)
        self.seed = int(seed)
        self.temperature = float(temperature)
        self.retry_temperature = float(retry_temperature)
        self.feedback_max_chars = int(feedback_max_chars)
        self.model_ref = str(model_ref or model)
        self.rubric_dir = rubric_dir
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.requests_sent = 0
        self.retries = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def __repr__(self) -> str:
        key = "set" if self._api_key else "none"
        return (f"OpenAIJudge(model={self.model!r}, base_url={safe_url(self.base_url)!r}, api_key=<{key}>, "
                f"max_concurrency={self.max_concurrency}, model_ref={self.model_ref!r})")

    __str__ = __repr__

    # -- lifecycle -------------------------------------------------------------------------------------------
    def setup(self) -> OpenAIJudge:
        """Cheap: nothing to load (the endpoint holds the model). Use :meth:`list_models` to check the endpoint."""
        import openai  # noqa: F401  (fail early if the dependency is missing)

        return self

    def teardown(self) -> None:
        pass

    @property
    def chat_url(self) -> str:
        return f"{self.base_url}/chat/completions"

    # -- sync entry points -----------------------------------------------------------------------------------
    def _generate(self, items: list[JudgeItem], rubric: Rubric, attempt: int, batch_index: int) -> list[str]:
        schema = judgement_schema(rubric, self.feedback_max_chars)
        messages_list = [build_messages(it, rubric, self.feedback_max_chars) for it in items]
        return self._run(lambda: self._complete_all(messages_list, schema, "judgement", attempt, batch_index))

    def generate_structured(self, messages_list: list[list[dict]], schema: dict, attempt: int = 0,
                            seed: int = 0) -> list[str]:
        """One completion per conversation in ``messages_list`` (``build_messages``-style or OpenAI-style parts),
        constrained to ``schema`` (``response_format`` json_schema, strict); the raw texts, in order. ``attempt``
        0 decodes at ``temperature``, later attempts sample at ``retry_temperature``; the request seed is
        ``self.seed + 1_000_003 * attempt + seed``. Transport failures raise :class:`OpenAIJudgeError`; an answer that
        is not a chat completion comes back as a :class:`labelers.judge.BadAnswer` in its place (the parsers report
        it as that conversation's parse error)."""
        return self._run(lambda: self.agenerate_structured(messages_list, schema, attempt, seed))

    async def agenerate_structured(self, messages_list: list[list[dict]], schema: dict, attempt: int = 0,
                                   seed: int = 0) -> list[str]:
        """:meth:`generate_structured` for callers already inside an event loop."""
        return await self._complete_all(messages_list, schema, schema_name(schema), attempt, seed)

    def list_models(self) -> list[str]:
        """The ids of ``GET {base_url}/models`` (with the same retries): a cheap check of URL and key."""
        return self._run(self._list_models)

    # -- machinery -------------------------------------------------------------------------------------------
    @staticmethod
    def _run(factory: Callable[[], Any]) -> Any:
        """Run the coroutine ``factory()`` to completion from sync code: ``asyncio.run`` here, or in a worker
        thread when this thread already runs an event loop (a notebook, an async caller)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(factory())
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="openai-judge") as pool:
            return pool.submit(lambda: asyncio.run(factory())).result()

    def _client(self):
        """A client for one call (its connections belong to the event loop of that call), without retries of its
        own (:meth:`_request` retries). Without a key requests omit ``Authorization`` (:meth:`_extra_headers`)."""
        import openai

        return openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=self._api_key.get_secret_value() if self._api_key is not None else "unused",
            timeout=openai.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0)),
            max_retries=0,
            default_headers={"User-Agent": "prefmill-openai-judge"},
        )

    def _extra_headers(self) -> dict:
        """Per-request headers: with no key, ``Authorization`` explicitly omitted (the client insists on one)."""
        if self._api_key is not None:
            return {}
        import openai

        return {"Authorization": openai.Omit()}

    def _redact(self, text: str) -> str:
        if self._api_key is not None and self._api_key.get_secret_value():
            text = text.replace(self._api_key.get_secret_value(), "<redacted>")
        return text

    def _sampling(self, attempt: int, seed_offset: int) -> tuple[float, int]:
        temperature = self.temperature if attempt == 0 else self.retry_temperature
        return temperature, self.seed + 1_000_003 * int(attempt) + int(seed_offset)

    def _params(self, messages: list[dict], schema: dict, name: str, temperature: float, seed: int) -> dict:
        """The keyword arguments of ``chat.completions.create`` for one conversation (its body, as before)."""
        return {
            "model": self.model,
            "messages": to_openai_messages(messages),
            "max_tokens": self.max_new_tokens,
            "temperature": temperature,
            "seed": seed,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": True},
            },
            "extra_headers": self._extra_headers(),
        }

    async def _complete_all(self, messages_list: Sequence[list[dict]], schema: dict, name: str, attempt: int,
                            seed_offset: int) -> list[str]:
        if not messages_list:
            return []
        temperature, seed = self._sampling(attempt, seed_offset)
        semaphore = asyncio.Semaphore(self.max_concurrency)
        async with self._client() as client:

            async def one(messages: list[dict]) -> str | BadAnswer:
                async with semaphore:
                    # PNG encoding off the event loop, so encoding overlaps with requests in flight
                    params = await asyncio.to_thread(self._params, messages, schema, name, temperature, seed)
                    try:
                        data = await self._request(
                            "POST", self.chat_url, lambda: client.chat.completions.with_raw_response.create(**params))
                    except MalformedAnswerError as e:  # this item's answer is unreadable: its parse error
                        return BadAnswer(str(e), e.raw)
                return self._content(data)

            tasks = [asyncio.ensure_future(one(m)) for m in messages_list]
            try:
                # fail fast: the first error cancels the rest
                done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    if t.exception() is not None:
                        raise t.exception()
                return [t.result() for t in tasks]
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _list_models(self) -> list[str]:
        async with self._client() as client:
            headers = self._extra_headers()
            data = await self._request("GET", f"{self.base_url}/models",
                                       lambda: client.models.with_raw_response.list(extra_headers=headers))
        return [str(m.get("id")) for m in data.get("data", []) if isinstance(m, dict)]

    def _content(self, data: dict) -> str | BadAnswer:
        """The answer text of a chat completion, or a :class:`BadAnswer` when ``data`` is not one (the driver
        reports it as the item's parse error). Token counts that are not plain numbers count as 0."""
        usage = data.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        self.prompt_tokens += _token_count(usage.get("prompt_tokens"))
        self.completion_tokens += _token_count(usage.get("completion_tokens"))
        try:
            message = data["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            message = None
        if not isinstance(message, dict):
            text = self._redact(str(data)[:300])
            return BadAnswer(f"{safe_url(self.chat_url)}: answer without choices[0].message: {text}", text)
        content = message.get("content")
        if content is None:  # a refusal, or a server that put nothing there: the parser reports it
            content = message.get("refusal") or ""
        if isinstance(content, list):  # content parts
            content = "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        return content if isinstance(content, str) else BadAnswer(
            f"message content is {type(content).__name__}, not text", self._redact(repr(content)[:300]))

    async def _request(self, method: str, url: str, send: Callable[[], Awaitable[Any]]) -> dict:
        """The JSON object answered to ``send()`` (one request of the ``openai`` client, raw response), tried up to
        ``max_attempts`` times; ``method`` and ``url`` name it in messages."""
        import tenacity

        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.max_attempts),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type(_Retryable),
            before_sleep=self._before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(method, url, send)
        except _Retryable as e:
            raise OpenAIJudgeError(
                f"{method} {safe_url(url)} failed after {self.max_attempts} attempt(s): {self._redact(e.reason)}"
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, retry_state: Any) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return exc.retry_after
        import random

        base = min(self.max_backoff_s, self.backoff_s * 2 ** max(0, retry_state.attempt_number - 1))
        return base + random.uniform(0, base)  # jitter: spread clients that failed together

    def _before_sleep(self, retry_state: Any) -> None:
        self.retries += 1
        exc = retry_state.outcome.exception()
        sleep = retry_state.next_action.sleep if retry_state.next_action else 0.0
        log.warning("judge endpoint %s: %s; retry %d/%d in %.2f s", safe_url(self.base_url),
                    self._redact(getattr(exc, "reason", type(exc).__name__)), retry_state.attempt_number,
                    self.max_attempts - 1, sleep)

    async def _attempt(self, method: str, url: str, send: Callable[[], Awaitable[Any]]) -> dict:
        import openai

        self.requests_sent += 1
        try:
            raw = await asyncio.wait_for(send(), timeout=self.timeout_s)
        except (asyncio.TimeoutError, openai.APITimeoutError) as e:
            raise _Retryable(f"timed out after {self.timeout_s:g} s ({type(e).__name__})") from None
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e.__context__
            detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
            raise _Retryable(f"{type(e).__name__}: {e}{detail}") from None
        except (openai.RateLimitError, openai.InternalServerError) as e:  # 429, 5xx
            raise _Retryable(f"HTTP {e.status_code}: {self._redact(server_message(e.response))}",
                             retry_after_seconds(e.response.headers)) from None
        except openai.APIStatusError as e:  # any other 4xx
            msg = self._redact(server_message(e.response))
            raise OpenAIHTTPError(f"{method} {safe_url(url)} answered HTTP {e.status_code} "
                                  f"({e.response.reason_phrase or 'error'}): {msg}", e.status_code, msg) from None
        return self._decode_body(raw.http_response, method, url)

    def _decode_body(self, response: Any, method: str, url: str) -> dict:
        """The JSON object of a 2xx answer, or :class:`MalformedAnswerError`: a body that is too long, nested
        deeper than :data:`MAX_BODY_DEPTH`, not JSON (numbers Python refuses to convert included), or not an
        object. The depth is checked before decoding (the decoder recurses once per level)."""
        status = response.status_code
        where = f"{method} {safe_url(url)}: HTTP {status}"
        try:
            text = response.text
        except Exception as e:  # noqa: BLE001 - an undecodable body is a malformed answer
            raise MalformedAnswerError(f"{where} with an unreadable body ({type(e).__name__})") from None
        head = self._redact(text[:200])
        if len(text) > MAX_BODY_CHARS:
            raise MalformedAnswerError(f"{where} with a body of {len(text)} characters (at most {MAX_BODY_CHARS})",
                                       head)
        if json_depth_exceeds(text, MAX_BODY_DEPTH):
            raise MalformedAnswerError(f"{where} with a body nested deeper than {MAX_BODY_DEPTH} levels", head)
        try:
            data = json.loads(text)
        except (ValueError, RecursionError, OverflowError, TypeError) as e:
            raise MalformedAnswerError(f"{where} with a body that is not JSON ({type(e).__name__}: "
                                       f"{self._redact(str(e)[:120])}): {head!r}", head) from None
        if not isinstance(data, dict):
            raise MalformedAnswerError(f"{where}: expected a JSON object, got {type(data).__name__}", head)
        return data
