"""Our small OpenAI-compatible chat-completions server for a local transformers VLM (the tiny zoo judge or any
Qwen2.5-VL directory / hub id), so :class:`labelers.openai_judge.OpenAIJudge` is tested against a real server and a
real model, and so a single machine can serve a judge to several pipeline processes.

    python -m labelers.judge_server --model zoo:judge --host 127.0.0.1 --port 8011 [--api-key KEY] [--max-batch 8]

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``GET /health`` (no auth). The request is what
OpenAIJudge sends: ``model`` (must be the served name), ``messages`` (text parts and ``image_url`` parts with
``data:`` URLs; remote URLs are refused), ``max_tokens`` (or ``max_completion_tokens``), ``temperature``, ``top_p``,
``seed``, ``response_format`` (``json_schema`` enforced with xgrammar, ``json_object``, or ``text``). ``n`` must be
1; streaming is not supported. Errors use OpenAI's shape ``{"error": {"message", "type", "code"}}``.

Greedy requests that arrive close together (within ``--batch-wait-ms``, up to ``--max-batch``) and share schema and
length are generated as one batch; sampled ones alone, so a seed reproduces its output whatever else is in flight.
Generation runs on one worker thread (model access serialized), so the event loop stays responsive. The model is
a :class:`labelers.judge.TransformersJudge` (its loading, grammars and generation loop, speed-ups included), so
the server answers exactly what the in-process judge answers.

Auth: ``--api-key KEY`` or ``--api-key-env VAR`` (better: not visible in ``ps``) makes ``/v1/*`` require
``Authorization: Bearer KEY`` (401 otherwise). Test hooks: ``--fail-first N`` answers the first N authorized chat
requests with ``--fail-status`` (default 503) and ``Retry-After: --fail-retry-after`` (default 0; negative: none).
Bind to 127.0.0.1 unless you mean to expose it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import concurrent.futures
import hmac
import io
import json
import logging
import os
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("labelers.judge_server")


class RequestError(ValueError):
    """A request the server will not run: answered with ``status`` (400 by default)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code


# ----------------------------------------------------------------------------------------------------------------
# Request parsing (pure apart from PIL)
# ----------------------------------------------------------------------------------------------------------------
def decode_data_url(url: str) -> Any:
    """``data:image/<fmt>;base64,...`` -> RGB PIL image. Anything else (http URLs included) is a RequestError."""
    from PIL import Image

    if not isinstance(url, str) or not url.startswith("data:"):
        shown = url[:40] if isinstance(url, str) else type(url).__name__
        raise RequestError(f"only data: image URLs are supported, got {shown!r}", param="messages")
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise RequestError("image data URL must be base64 encoded (data:image/png;base64,...)", param="messages")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("image data URL: invalid base64", param="messages") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decoding failure is the client's
        raise RequestError(f"image data URL: undecodable image ({type(e).__name__})", param="messages") from None


def parse_messages(messages: Any) -> list[dict]:
    """OpenAI chat messages -> the processor's form: text parts stay, ``image_url`` parts become
    ``{"type": "image", "image": PIL}``; string content stays a string."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}]: expected an object with role system, user or assistant",
                               param="messages")
        content = message.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                elif kind == "image_url":
                    spec = part.get("image_url")
                    url = spec.get("url") if isinstance(spec, dict) else spec
                    try:
                        parts.append({"type": "image", "image": decode_data_url(url)})
                    except RequestError as e:
                        raise RequestError(f"messages[{i}].content[{j}]: {e.message}", param="messages") from None
                else:
                    raise RequestError(f"messages[{i}].content[{j}]: unsupported part type {kind!r}",
                                       param="messages")
            content = parts
        elif not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of parts", param="messages")
        out.append({"role": message["role"], "content": content})
    return out


def schema_of(response_format: Any) -> tuple[str, Any]:
    """``response_format`` -> (kind, schema): ``("text", None)``, ``("json_object", None)`` or
    ``("json_schema", schema dict)``."""
    if response_format is None:
        return "text", None
    if not isinstance(response_format, dict):
        raise RequestError("response_format must be an object", param="response_format")
    kind = response_format.get("type", "text")
    if kind == "text":
        return "text", None
    if kind == "json_object":
        return "json_object", None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise RequestError("response_format.json_schema.schema must be a JSON schema object",
                               param="response_format")
        return "json_schema", schema
    raise RequestError(f"unsupported response_format type {kind!r}", param="response_format")


@dataclass
class GenRequest:
    messages: list[dict]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    format_kind: str
    schema: dict | None
    grammar: Any = None  # compiled, set by the server

    def group_key(self) -> tuple:
        """Requests with equal keys can share one ``generate`` call (one grammar, one length, greedy). A sampled
        request is generated alone, seeded with its ``seed``, so its output depends on its seed only, not on what
        else was in flight (as with vLLM's per-request seeds); greedy requests batch."""
        schema_key = json.dumps(self.schema, sort_keys=True) if self.schema is not None else None
        sampling = ("sampled", id(self)) if self.temperature > 0 else ("greedy",)
        return (self.format_kind, schema_key, self.max_tokens, sampling)


@dataclass
class GenResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def parse_request(body: Any, served_name: str, default_max_tokens: int, max_tokens_limit: int) -> GenRequest:
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    model = body.get("model")
    if model != served_name:
        raise RequestError(f"The model `{model}` does not exist; this server serves `{served_name}`.",
                           status=404, param="model", code="model_not_found")
    if body.get("stream"):
        raise RequestError("stream=true is not supported", param="stream")
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_tokens_limit:
        raise RequestError(f"max_tokens must be an integer in [1, {max_tokens_limit}]", param="max_tokens")
    temperature = body.get("temperature", 1.0)
    top_p = body.get("top_p", 1.0)
    seed = body.get("seed", 0)
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise RequestError(f"{name} must be a non-negative number", param=name)
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RequestError("seed must be an integer", param="seed")
    kind, schema = schema_of(body.get("response_format"))
    return GenRequest(
        messages=parse_messages(body.get("messages")),
        max_tokens=int(max_tokens),
        temperature=float(temperature),
        top_p=float(top_p) if top_p else 1.0,
        seed=int(seed),
        format_kind=kind,
        schema=schema,
    )


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------
class Engine:
    """A :class:`labelers.judge.TransformersJudge` (its loading, grammars, generation loop and speed-ups) behind a
    lock: :meth:`generate` runs one batch (same grammar/length/sampling) as one
    :meth:`~labelers.judge.TransformersJudge.generate_tokens` call and reports each row's finish reason and
    token counts."""

    def __init__(self, model: str, device: str = "cpu", dtype: str = "float32", cpu_threads: int | None = None):
        from labelers.judge.transformers_backend import TransformersJudge

        self.model_ref = model
        self.backend = TransformersJudge(model, device=device, dtype=dtype, cpu_threads=cpu_threads)
        self._lock = threading.Lock()
        self._compile_lock = threading.Lock()

    def load(self) -> Engine:
        self.backend.setup()
        return self

    def compile(self, kind: str, schema: dict | None):
        """The compiled grammar of a response format (cached); ``None`` for free text. Invalid schema -> 400."""
        if kind == "text":
            return None
        with self._compile_lock:
            try:
                if kind == "json_object":
                    return self.backend.compiled_json_object()
                return self.backend.compiled_schema(schema)
            except (RuntimeError, ValueError, TypeError) as e:  # what xgrammar raises on a schema it cannot compile
                raise RequestError(f"response_format schema not supported: {type(e).__name__}: {e}",
                                   param="response_format") from None

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        first = requests[0]
        with self._lock:
            new_tokens, prompt_lens = self.backend.generate_tokens(
                [r.messages for r in requests], first.grammar, max_new_tokens=first.max_tokens,
                temperature=first.temperature, top_p=first.top_p, seed=first.seed)
        tokenizer = self.backend.processor.tokenizer
        stops = set(self.backend.stop_ids) | {self.backend.pad_id}
        results = []
        for row, n_prompt in zip(new_tokens.tolist(), prompt_lens):
            end = next((k for k, t in enumerate(row) if t in stops), None)
            if end is None:
                results.append(GenResult(tokenizer.decode(row, skip_special_tokens=True), "length", n_prompt,
                                         len(row)))
            else:
                results.append(GenResult(tokenizer.decode(row[:end], skip_special_tokens=True), "stop", n_prompt,
                                         end + 1))
        return results


# ----------------------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Pending:
    request: GenRequest
    future: asyncio.Future
    key: tuple = field(default=())


class Batcher:
    """Collects requests for up to ``wait_s`` after the first (or until ``max_batch``), groups them by
    :meth:`GenRequest.group_key` and runs each group on the single generation thread."""

    def __init__(self, engine: Engine, max_batch: int = 8, wait_s: float = 0.01):
        self.engine = engine
        self.max_batch = max(1, int(max_batch))
        self.wait_s = max(0.0, float(wait_s))
        self.queue: asyncio.Queue | None = None
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="judge-generate")
        self.batches = 0
        self.requests = 0

    async def submit(self, request: GenRequest) -> GenResult:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(request, future, request.group_key()))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            groups: dict[tuple, list[_Pending]] = {}
            for p in batch:
                groups.setdefault(p.key, []).append(p)
            for group in groups.values():
                live = [p for p in group if not p.future.done()]
                if not live:
                    continue
                self.batches += 1
                self.requests += len(live)
                try:
                    results = await loop.run_in_executor(self.executor, self.engine.generate,
                                                         [p.request for p in live])
                except Exception as e:  # noqa: BLE001 - reported to each waiting request as a 500
                    log.exception("generation failed for a batch of %d", len(live))
                    for p in live:
                        if not p.future.done():
                            p.future.set_exception(e)
                    continue
                for p, r in zip(live, results):
                    if not p.future.done():
                        p.future.set_result(r)


# ----------------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------------
def _error(message: str, status: int, type_: str = "invalid_request_error", param: str | None = None,
           code: str | int | None = None, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code or status}},
                        status_code=status, headers=headers)


def create_app(engine: Engine, served_name: str, api_key: str | None = None, max_batch: int = 8,
               batch_wait_s: float = 0.01, fail_first: int = 0, fail_status: int = 503,
               fail_retry_after: float = 0.0, default_max_tokens: int = 512, max_tokens_limit: int = 4096,
               max_body_bytes: int = 64 << 20):
    """The starlette app serving ``engine`` (loaded) under ``served_name``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    batcher = Batcher(engine, max_batch=max_batch, wait_s=batch_wait_s)
    state = {"chat_requests": 0, "injected_failures": 0}
    created = int(time.time())
    expected = f"Bearer {api_key}".encode() if api_key else None

    def authorized(request: Request) -> bool:
        if expected is None:
            return True
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, expected)

    def unauthorized():
        # never echo what was presented
        return _error("Incorrect or missing API key (send Authorization: Bearer <key>).", 401,
                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": served_name, "batches": batcher.batches,
                             "requests": batcher.requests, "injected_failures": state["injected_failures"]})

    async def models(request: Request):
        if not authorized(request):
            return unauthorized()
        return JSONResponse({"object": "list", "data": [
            {"id": served_name, "object": "model", "created": created, "owned_by": "prefmill"}]})

    async def chat_completions(request: Request):
        if not authorized(request):
            return unauthorized()
        state["chat_requests"] += 1
        if state["chat_requests"] <= fail_first:
            state["injected_failures"] += 1
            headers = {"Retry-After": f"{fail_retry_after:g}"} if fail_retry_after >= 0 else None
            return _error(f"injected failure {state['chat_requests']}/{fail_first} (--fail-first)", fail_status,
                          type_="server_error" if fail_status >= 500 else "rate_limit_error", headers=headers)
        try:
            raw = await request.body()
            if len(raw) > max_body_bytes:
                raise RequestError(f"request body over {max_body_bytes} bytes", status=413)
            try:
                body = json.loads(raw)
            except ValueError:
                raise RequestError("request body is not JSON") from None
            gen = await asyncio.to_thread(parse_request, body, served_name, default_max_tokens, max_tokens_limit)
            gen.grammar = await asyncio.to_thread(engine.compile, gen.format_kind, gen.schema)
        except RequestError as e:
            return _error(e.message, e.status, param=e.param, code=e.code)
        try:
            result = await batcher.submit(gen)
        except Exception as e:  # noqa: BLE001
            return _error(f"generation failed: {type(e).__name__}: {e}", 500, type_="server_error")
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens},
        })

    @asynccontextmanager
    async def lifespan(app):
        batcher.queue = asyncio.Queue()
        worker = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
            batcher.executor.shutdown(wait=False, cancel_futures=True)

    app = Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ], lifespan=lifespan)
    app.state.batcher = batcher
    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labelers.judge_server",
                                description="OpenAI-compatible chat-completions server for a local transformers "
                                            "VLM judge (JSON schemas enforced with xgrammar).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="zoo:judge", help="zoo:<name>, a local save_pretrained directory or a hub id")
    p.add_argument("--served-model-name", default=None, help="name clients send as `model` (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (visible in ps: prefer "
                                                   "--api-key-env)")
    p.add_argument("--api-key-env", default=None, metavar="VAR", help="read the API key from this env variable")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cpu-threads", type=int, default=None, help="torch intra-op threads while generating")
    p.add_argument("--max-batch", type=int, default=8, help="most requests generated together")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long the first request waits for company")
    p.add_argument("--max-tokens", type=int, default=512, help="default max_tokens when a request has none")
    p.add_argument("--max-tokens-limit", type=int, default=4096)
    p.add_argument("--fail-first", type=int, default=0, help="test hook: fail the first N chat requests")
    p.add_argument("--fail-status", type=int, default=503, help="test hook: the status of those failures")
    p.add_argument("--fail-retry-after", type=float, default=0.0,
                   help="test hook: their Retry-After seconds (negative: no header)")
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = args.api_key
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            print(f"judge_server: environment variable {args.api_key_env} is empty", file=sys.stderr)
            return 2
    import uvicorn

    t0 = time.perf_counter()
    engine = Engine(args.model, device=args.device, dtype=args.dtype, cpu_threads=args.cpu_threads).load()
    served = args.served_model_name or args.model
    log.info("loaded %s in %.1f s; serving it as %r on http://%s:%d/v1 (auth %s)", args.model,
             time.perf_counter() - t0, served, args.host, args.port, "on" if api_key else "off")
    app = create_app(engine, served, api_key=api_key, max_batch=args.max_batch,
                     batch_wait_s=args.batch_wait_ms / 1000.0, fail_first=args.fail_first,
                     fail_status=args.fail_status, fail_retry_after=args.fail_retry_after,
                     default_max_tokens=args.max_tokens, max_tokens_limit=args.max_tokens_limit)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
