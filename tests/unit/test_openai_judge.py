"""OpenAIJudge against our own OpenAI-compatible server (labelers.judge_server) running the tiny zoo judge in a
subprocess: real HTTP, real model, real grammar; failures injected by the server itself."""

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import httpx
import pytest
from PIL import Image

from labelers.judge import JudgeItem
from labelers.openai_judge import (
    OpenAIHTTPError,
    OpenAIJudge,
    OpenAIJudgeError,
    retry_after_seconds,
    to_openai_messages,
)
from labelers.rubrics import load_rubric

REPO = Path(__file__).resolve().parents[2]
KEY = "secret-test-key"
FAIL_FIRST = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def images(n, size=64):
    return [Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (53 * i + 40) % 256)) for i in range(n)]


@contextlib.contextmanager
def running_server(tmp_dir: Path, *extra: str):
    """``python -m labelers.judge_server`` on a free 127.0.0.1 port (own session, killed as a group at the end)."""
    port = free_port()
    log_path = tmp_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "labelers.judge_server", "--model", "zoo:judge", "--host", "127.0.0.1",
           "--port", str(port), "--api-key", KEY, "--cpu-threads", "1", "--max-batch", "8", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"judge server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                r = httpx.get(f"{base_url}/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=2)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"judge server not up after 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield {"base_url": base_url, "port": port, "log": log_path}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("judge_server"), "--fail-first", str(FAIL_FIRST),
                        "--fail-status", "503") as info:
        yield info


def server_stats(server) -> dict:
    return httpx.get(f"http://127.0.0.1:{server['port']}/health", timeout=5).json()


def make_judge(server, **kw) -> OpenAIJudge:
    kw = {"api_key": KEY, "max_concurrency": 4, "timeout_s": 60, "backoff_s": 0.05, "max_new_tokens": 512, **kw}
    return OpenAIJudge("zoo:judge", server["base_url"], **kw).setup()


# first in file order, so it meets the server's injected 503s (its counts hold in any order)
def test_judges_t2i_through_the_server_after_injected_503s(server):
    injected_before = server_stats(server)["injected_failures"]
    judge = make_judge(server)
    items = [JudgeItem(f"k{i}", "t2i", f"a photo of thing {i}", im) for i, im in enumerate(images(4))]
    results = judge.judge(items)
    rubric = load_rubric("t2i")
    assert [r.key for r in results] == ["k0", "k1", "k2", "k3"]
    for r in results:
        assert r.status == "ok", (r.error, r.raw)
        assert r.attempts == 1  # grammar on the server: valid on the first try
        assert set(r.scores) == set(rubric.dimension_names) == set(r.feedback)
        for v in r.scores.values():
            assert v == int(v) and 0 <= v <= 5
        json.loads(r.raw)  # strict JSON, not only parseable by our lenient parser
    # the two injected 503s (Retry-After: 0) were retried, and nothing else was
    injected = server_stats(server)["injected_failures"]
    assert injected == FAIL_FIRST
    assert judge.retries == injected - injected_before  # == FAIL_FIRST when run first, as in file order
    assert judge.requests_sent == len(items) + judge.retries
    assert judge.prompt_tokens > 0 and judge.completion_tokens > 0
    assert judge.judge_id_for("t2i") == OpenAIJudge("zoo:judge", "http://elsewhere/v1").judge_id_for("t2i")
    assert judge.judge_id_for("t2i") != judge.judge_id_for("edit")


def test_edit_and_multi_ref_and_generate_structured(server):
    judge = make_judge(server)
    src, out = images(2)
    refs = images(2, size=48)
    res = judge.judge([
        JudgeItem("e", "edit", "make it blue", out, source_image=src),
        JudgeItem("m", "multi_ref", "the subject in the scene", out, reference_images=refs,
                  reference_types=["subject", "background"]),
    ])
    assert [r.status for r in res] == ["ok", "ok"], [(r.error, r.raw) for r in res]
    assert set(res[0].scores) == {"instruction_following", "detail_preservation", "visual_quality"}
    # a caller's own schema (what the pairwise judge sends), from inside a running event loop (thread path)
    schema = {
        "title": "pairwise verdict",
        "type": "object",
        "properties": {"winner": {"type": "string", "enum": ["A", "B", "tie"]},
                       "reason": {"type": "string", "pattern": '^[^\\x00-\\x1f"\\\\]{1,60}$'}},
        "required": ["winner", "reason"],
        "additionalProperties": False,
    }
    a, b = images(2)
    conversation = [{"role": "system", "content": [{"type": "text", "text": "Pick the better image."}]},
                    {"role": "user", "content": [{"type": "text", "text": "A:"}, {"type": "image", "image": a},
                                                 {"type": "text", "text": "B:"}, {"type": "image", "image": b}]}]

    async def from_async_code():
        return judge.generate_structured([conversation, conversation], schema, attempt=1, seed=7)

    raws = asyncio.run(from_async_code())
    assert len(raws) == 2
    for raw in raws:
        data = json.loads(raw)
        assert set(data) == {"winner", "reason"} and data["winner"] in ("A", "B", "tie")
    assert raws[0] == raws[1]  # same seed, same prompt


def test_wrong_api_key_is_a_clear_401_without_the_key(server):
    wrong = "wrong-key-0123456789"
    judge = make_judge(server, api_key=wrong)
    with pytest.raises(OpenAIHTTPError) as info:
        judge.judge([JudgeItem("k", "t2i", "a cat", images(1)[0])])
    err = info.value
    assert err.status == 401 and "401" in str(err) and "API key" in str(err)
    rendered = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    for text in (str(err), repr(err), rendered, err.server_message):
        assert wrong not in text and KEY not in text
    assert judge.requests_sent == 1 and judge.retries == 0  # never retried


def test_unknown_model_is_a_clear_404(server):
    judge = OpenAIJudge("no-such-model", server["base_url"], api_key=KEY, backoff_s=0.01)
    with pytest.raises(OpenAIHTTPError, match="404.*no-such-model.*zoo:judge"):
        judge.generate_structured([[{"role": "user", "content": "hi"}]], {"type": "object"})
    assert judge.requests_sent - judge.retries == 1  # the 404 itself is not retried


def test_missing_image_is_image_error_without_a_request():
    judge = OpenAIJudge("zoo:judge", f"http://127.0.0.1:{free_port()}/v1", api_key=KEY, max_attempts=1)
    (res,) = judge.judge([JudgeItem("gone", "t2i", "a cat", None)])
    assert res.status == "image_error" and res.attempts == 0 and "missing image" in res.error
    assert judge.requests_sent == 0


def test_key_never_in_repr_or_logs(server, caplog):
    judge = make_judge(server)
    for text in (repr(judge), str(judge), repr(vars(judge))):
        assert KEY not in text
    assert "api_key=<set>" in repr(judge)
    with caplog.at_level(logging.DEBUG):  # httpx/httpcore debug logging included
        assert judge.list_models() == ["zoo:judge"]
        assert judge.judge([JudgeItem("k", "t2i", "a cat", images(1)[0])])[0].ok
        with pytest.raises(OpenAIHTTPError):
            make_judge(server, api_key="another-secret-key").list_models()
        with pytest.raises(OpenAIJudgeError):  # retries log warnings: still no key
            OpenAIJudge("zoo:judge", f"http://127.0.0.1:{free_port()}/v1", api_key=KEY, max_attempts=2,
                        backoff_s=0.01).list_models()
    assert caplog.records, "expected some log records (httpx logs each request)"
    logged = caplog.text + "".join(repr(r.args) + repr(r.__dict__) for r in caplog.records)
    assert KEY not in logged and "another-secret-key" not in logged
    assert KEY not in server["log"].read_text()  # the server does not log it either


def test_unreachable_endpoint_fails_after_bounded_attempts():
    port = free_port()  # nothing listens there
    judge = OpenAIJudge("zoo:judge", f"http://127.0.0.1:{port}/v1", api_key=KEY, max_attempts=3, backoff_s=0.01,
                        timeout_s=5)
    t0 = time.monotonic()
    with pytest.raises(OpenAIJudgeError) as info:
        judge.judge([JudgeItem("k", "t2i", "a cat", images(1)[0])])
    msg = str(info.value)
    assert f"127.0.0.1:{port}" in msg and "after 3 attempt" in msg and "Connect" in msg, msg
    assert KEY not in msg
    assert judge.requests_sent == 3 and judge.retries == 2
    assert time.monotonic() - t0 < 10


def test_429_honours_retry_after(tmp_path):
    # a second server whose first answer is 429 with Retry-After: 1; the client's own backoff would be ~0.01 s
    with running_server(tmp_path, "--fail-first", "1", "--fail-status", "429", "--fail-retry-after", "1") as srv:
        judge = make_judge(srv, backoff_s=0.01)
        t0 = time.monotonic()
        schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                  "required": ["a"], "additionalProperties": False}  # bounded: a random model must terminate
        raws = judge.generate_structured([[{"role": "user", "content": "hi"}]], schema)
        elapsed = time.monotonic() - t0
    assert isinstance(json.loads(raws[0])["a"], int)
    assert judge.retries == 1 and judge.requests_sent == 2
    assert 1.0 <= elapsed < 10, elapsed


def test_server_answers_like_the_in_process_judge(server):
    """Same model, same prompt, greedy under the same grammar: the server's text equals TransformersJudge's."""
    from labelers.judge import TransformersJudge

    local = TransformersJudge("zoo:judge", batch_size=1, cpu_threads=1).setup()
    remote = make_judge(server)
    item = JudgeItem("k", "t2i", "a red fox in snow", images(1, size=80)[0])
    (a,), (b,) = local.judge([item]), remote.judge([item])
    assert a.ok and b.ok and a.raw == b.raw and a.scores == b.scores


# -- pure helpers -----------------------------------------------------------------------------------------------
def test_retry_after_parsing():
    assert retry_after_seconds({"retry-after": "0"}) == 0.0
    assert retry_after_seconds({"retry-after": "2.5"}) == 2.5
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "-3"}) == 0.0
    assert retry_after_seconds({"retry-after": "86400"}) == 300.0  # capped
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None
    when = "Wed, 21 Oct 2015 07:28:00 GMT"
    from email.utils import parsedate_to_datetime

    now = parsedate_to_datetime(when).timestamp() - 4
    assert abs(retry_after_seconds({"retry-after": when}, now=now) - 4) < 1e-6


def test_messages_become_openai_parts():
    rubric = load_rubric("t2i")
    from labelers.judge import build_messages

    msgs = to_openai_messages(build_messages(JudgeItem("k", "t2i", "a cat", images(1)[0]), rubric))
    system, user = msgs
    assert system["role"] == "system" and isinstance(system["content"], str) and "Dimensions" in system["content"]
    kinds = [p["type"] for p in user["content"]]
    assert kinds == ["text", "image_url", "text"]
    url = user["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    with pytest.raises(ValueError, match="image is None"):
        to_openai_messages([{"role": "user", "content": [{"type": "image", "image": None}]}])


def test_bad_constructor_arguments_do_not_echo_credentials():
    with pytest.raises(ValueError) as info:
        OpenAIJudge("m", "ftp://user:pw-in-url@host/v1")
    assert "pw-in-url" not in str(info.value)
    j = OpenAIJudge("m", "https://user:pw-in-url@host/v1", api_key=KEY)
    assert "pw-in-url" not in repr(j) and KEY not in repr(j)
