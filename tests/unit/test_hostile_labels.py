"""Hostile judge answers and broken rewards through the real code (issue items 5 and 6).

* One bad answer — an absurdly long integer, absurd nesting, NaN / Infinity, a float that overflows, a non-integer
  score where the schema says integer, a backend's unreadable HTTP answer — is *that item's* ``parse_error`` after
  the bounded retries, with its reason; the other items of the batch stay ``ok``. Driven through every backend:
  ``TransformersJudge`` (tiny zoo judge, its ``model.generate`` replaced by crafted token ids, so processor,
  prefix cache, decoding and the driver all run), ``VllmJudge``'s request path (a fake engine), ``OpenAIJudge``
  against an in-process HTTP server answering crafted bodies, and ``PairwiseJudge``.
* A NaN / ±inf among a row's rewards (CLIP similarities, λ-Harmonic, DRS, preference score, a judge score) makes
  the row ``reward_error`` with the field and value named — never ``ok``, never clamped into range — and the
  contract check (``label_problems``, the blocking ``labels_follow_contract``) fails on any such value in an ok row.
"""

import json
import math
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import polars as pl
import pytest
from PIL import Image

import labelers.judge.vllm_backend as judge_module
from labelers.clip_scorer import ClipScores
from labelers.diagnostics import parse_error_rate, status_counts
from labelers.filters import MISSING_REWARD, judge_failure
from labelers.judge import (
    BadAnswer,
    JudgeItem,
    JudgementParseError,
    JudgeResult,
    TransformersJudge,
    VllmJudge,
    _JudgeBase,
    parse_judgement,
)
from labelers.openai_judge import OpenAIJudge
from labelers.pairs import select_pairs
from labelers.pairwise import PairItem, PairwiseJudge, parse_verdict
from labelers.rewards import drs_clip_i, drs_sharpen, lambda_harmonic
from labelers.rubrics import load_rubric
from labelers.stage import LabelingStage, label_schema
from labelers.validation import label_problems

T2I = load_rubric("t2i")
INF, NAN = float("inf"), float("nan")
HUGE = "9" * 5001  # Python refuses int("9" * 5001): ValueError, "Exceeds the limit (4300 digits)"
DEEP = "[" * 30000 + "]" * 30000  # under the length bound; json.loads alone raises RecursionError


def judgement(score="3", aesthetics="3"):
    """A t2i judgement with raw JSON text for the scores (so NaN, 2.5, huge numbers can be spliced in)."""
    return ('{"prompt_alignment": {"score": %s, "feedback": "on prompt"}, '
            '"visual_quality": {"score": 3, "feedback": "sharp"}, '
            '"aesthetics": {"score": %s, "feedback": "pleasant"}}' % (score, aesthetics))


# Hostile answers and the exact reason each must give (before " (after N attempts)").
HOSTILE = {
    "huge_int": (judgement(HUGE), "number with 5001 digits (more than 32)"),
    "huge_negative": (judgement("-" + HUGE), "number with 5001 digits (more than 32)"),
    "deep": (DEEP, "JSON nested deeper than 16 levels"),
    "deep_in_score": (judgement('{"a": ' * 40 + "1" + "}" * 40), "JSON nested deeper than 16 levels"),
    "too_long": ("[" * 100_000, "output too long (100000 characters, at most 65536)"),
    "nan": (judgement("NaN"), "non-finite number NaN (not JSON)"),
    "infinity": (judgement("Infinity"), "non-finite number Infinity (not JSON)"),
    "neg_infinity": (judgement("-Infinity"), "non-finite number -Infinity (not JSON)"),
    "overflow_float": (judgement("1e999"), "number 1e999 overflows to inf"),
    "non_integer": (judgement(aesthetics="2.5"), "aesthetics: score 2.5 is not an integer"),
    "bool_score": (judgement("true"), "prompt_alignment: score True is not a number"),
}


# -- the parser -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_parser_turns_every_hostile_answer_into_a_parse_error(case):
    raw, reason = HOSTILE[case]
    with pytest.raises(JudgementParseError) as info:
        parse_judgement(raw, T2I)
    assert info.value.reason == reason


def test_integral_numbers_are_integers_and_bad_answers_are_reasons():
    scores, _ = parse_judgement(judgement("4.0", "0"), T2I)  # JSON Schema: 4.0 is an integer
    assert scores == {"prompt_alignment": 4.0, "visual_quality": 3.0, "aesthetics": 0.0}
    for raw, reason in [(BadAnswer("endpoint said no"), "endpoint said no"), (None, "output is NoneType, not text"),
                        (b"{}", "output is bytes, not text")]:
        with pytest.raises(JudgementParseError) as info:
            parse_judgement(raw, T2I)
        assert info.value.reason == reason
    # a hostile pairwise verdict, likewise
    for raw, reason in [('{"verdict": %s, "reason": "x"}' % HUGE, "number with 5001 digits (more than 32)"),
                        ('{"verdict": NaN, "reason": "x"}', "non-finite number NaN (not JSON)"),
                        (DEEP, "JSON nested deeper than 16 levels")]:
        with pytest.raises(JudgementParseError) as info:
            parse_verdict(raw)
        assert info.value.reason == reason


# -- TransformersJudge (tiny zoo judge) with crafted generations ----------------------------------------------
@pytest.fixture(scope="module")
def tiny_judge():
    return TransformersJudge("zoo:judge", cpu_threads=1, batch_size=32, max_retries=2).setup()


class CraftedGeneration:
    """Stands in for ``model.generate``: each row's answer is the script's entry for the ``case:<key>`` in its
    prompt at this attempt (one call per attempt: every test item fits one chunk), as token ids appended to the
    prompt and ended with a stop token — what the real ``generate`` returns; the real decoding follows."""

    def __init__(self, judge, script):
        self.judge, self.script, self.calls = judge, script, []

    def __call__(self, input_ids=None, **kwargs):
        import torch

        tok = self.judge.processor.tokenizer
        attempt = len(self.calls)
        keys, rows = [], []
        for row in input_ids:
            key = re.search(r"case:(\w+)", tok.decode(row)).group(1)
            answers = self.script[key]
            keys.append(key)
            answer = answers[min(attempt, len(answers) - 1)]
            rows.append(tok(answer, add_special_tokens=False)["input_ids"] + [self.judge._stop_ids[0]])
        self.calls.append(keys)
        new = torch.full((len(rows), max(map(len, rows))), self.judge._pad_id, dtype=input_ids.dtype)
        for i, ids in enumerate(rows):
            new[i, : len(ids)] = torch.tensor(ids, dtype=input_ids.dtype)
        return torch.cat([input_ids, new], dim=1)


def img(colour=(200, 30, 30), size=32):
    return Image.new("RGB", (size, size), colour)


def test_transformers_judge_hostile_answers_are_per_item_parse_errors(tiny_judge, monkeypatch):
    script = {case: [raw] for case, (raw, _) in HOSTILE.items()}
    script.update(good=[judgement("4")], late=["not json", judgement("2")], good2=[judgement("5", "1")])
    fake = CraftedGeneration(tiny_judge, script)
    monkeypatch.setattr(tiny_judge.model, "generate", fake)
    keys = ["good", *HOSTILE, "late", "good2"]
    items = [JudgeItem(k, "t2i", f"case:{k}", img()) for k in keys]
    items.insert(1, JudgeItem("noimg", "t2i", "case:good", None))
    results = tiny_judge.judge(items)  # must not raise, whatever the answers hold
    by = {r.key: r for r in results}
    assert [r.key for r in results] == ["good", "noimg", *HOSTILE, "late", "good2"]
    assert (by["good"].status, by["good"].attempts, by["good"].scores) == (
        "ok", 1, {"prompt_alignment": 4.0, "visual_quality": 3.0, "aesthetics": 3.0})
    assert (by["good2"].status, by["good2"].attempts) == ("ok", 1)
    assert (by["late"].status, by["late"].attempts, by["late"].scores["prompt_alignment"]) == ("ok", 2, 2.0)
    assert by["noimg"].status == "image_error" and by["noimg"].attempts == 0
    for case, (raw, reason) in HOSTILE.items():
        r = by[case]
        assert (r.status, r.attempts, r.scores) == ("parse_error", 3, {}), case
        assert r.error == f"{reason} (after 3 attempts)", case
        assert isinstance(r.raw, str) and len(r.raw) <= 65_536 + 40
    assert by["deep"].raw == DEEP  # kept as generated (decoded)
    assert by["too_long"].raw.endswith("...[34464 more characters]")
    # bounded retries: attempt 0 for everything, then only the failures, twice
    assert [len(c) for c in fake.calls] == [len(keys), len(HOSTILE) + 1, len(HOSTILE)]
    assert Counter(r.status for r in results) == {"parse_error": len(HOSTILE), "ok": 3, "image_error": 1}


def test_pairwise_on_the_tiny_judge_hostile_verdicts_are_per_pair_parse_errors(tiny_judge, monkeypatch):
    good = '{"verdict": "A", "reason": "sharper"}'
    script = {
        "good": [good],
        "huge": ['{"verdict": %s, "reason": "x"}' % HUGE],
        "deep": [DEEP],
        "nan": ['{"verdict": "A", "reason": NaN}'],
        "late": ["garbage", good],
    }
    fake = CraftedGeneration(tiny_judge, script)
    monkeypatch.setattr(tiny_judge.model, "generate", fake)
    judge = PairwiseJudge(tiny_judge)
    pairs = [PairItem(k, "t2i", f"case:{k}", img((200, 0, 0)), img((0, 0, 200)), prompt_id="P", id_a=f"{k}a",
                      id_b=f"{k}b") for k in script]
    res = {v.key: v for v in judge.compare(pairs)}
    assert (res["good"].status, res["good"].verdict, res["good"].consistent) == ("ok", "tie", False)  # A, A
    assert (res["late"].status, res["late"].attempts) == ("ok", 2)
    reasons = {"huge": "number with 5001 digits (more than 32)", "deep": "JSON nested deeper than 16 levels",
               "nan": "non-finite number NaN (not JSON)"}
    for key, reason in reasons.items():
        v = res[key]
        assert (v.status, v.verdict, v.attempts) == ("parse_error", None, 3)
        assert v.error == f"order AB: {reason}; order BA: {reason} (after 3 attempts)"
    assert [len(c) for c in fake.calls] == [10, 8, 6]  # both orders of every pair, then only failures


# -- VllmJudge: the request path with a fake engine -------------------------------------------------------------
class _EchoTemplate:
    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return "".join(f"<{m['role']}>" + "".join("<image>" if p["type"] == "image" else p["text"]
                                                   for p in m["content"]) for m in messages) + "<assistant>"


class FakeEngine:
    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, requests, params, use_tqdm=False):
        attempt = len(self.calls)
        keys = [re.search(r"case:(\w+)", r["prompt"]).group(1) for r in requests]
        self.calls.append((keys, params))
        out = []
        for key in keys:
            answer = self.script[key][min(attempt, len(self.script[key]) - 1)]
            out.append(SimpleNamespace(outputs=[] if answer is Ellipsis else [SimpleNamespace(text=answer)]))
        return out


def test_vllm_request_path_hostile_answers_are_per_item_parse_errors(monkeypatch):
    monkeypatch.setattr(judge_module, "vllm_structured_sampling_params", lambda schema, **kw: {"schema": schema, **kw})
    script = {case: [raw] for case, (raw, _) in HOSTILE.items()}
    script.update(good=[judgement()], no_outputs=[Ellipsis], none_text=[None])
    judge = VllmJudge("fake-vlm", max_retries=2)
    judge.processor, judge.llm = _EchoTemplate(), FakeEngine(script)
    results = {r.key: r for r in judge.judge([JudgeItem(k, "t2i", f"case:{k}", img()) for k in script])}
    assert results["good"].status == "ok" and results["good"].attempts == 1
    expected = {case: reason for case, (_, reason) in HOSTILE.items()}
    expected.update(no_outputs="empty output", none_text="output is NoneType, not text")
    for key, reason in expected.items():
        assert (results[key].status, results[key].error) == ("parse_error", f"{reason} (after 3 attempts)"), key
        assert isinstance(results[key].raw, str)
    assert [len(keys) for keys, _ in judge.llm.calls] == [len(script), len(expected), len(expected)]
    assert judge.llm.calls[1][1]["temperature"] == 1.0  # retries sample


# -- OpenAIJudge against an in-process server answering crafted bodies ----------------------------------------
def completion(content, usage=None) -> bytes:
    body = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                           "content": content}}]}
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body).encode()


VALID_BODY = completion(judgement("4"))
RAW_BODIES = {  # 200 answers that are not chat completions at all
    "html": (b"<html>proxy login</html>", "HTTP 200 with a body that is not JSON (JSONDecodeError"),
    "deep_body": (b"[" * 100_000, "HTTP 200 with a body nested deeper than 64 levels"),
    "huge_usage": (VALID_BODY[:-1] + b', "usage": {"prompt_tokens": ' + HUGE.encode() + b"}}",
                   "HTTP 200 with a body that is not JSON (ValueError: Exceeds the limit (4300 digits)"),
    "no_choices": (b'{"id": "x", "object": "chat.completion"}', "answer without choices[0].message"),
    "content_dict": (json.dumps({"choices": [{"message": {"content": {"prompt_alignment": 3}}}]}).encode(),
                     "message content is dict, not text"),
    "array_body": (b"[1, 2]", "expected a JSON object, got list"),
}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        key = re.search(rb"case:(\w+)", body).group(1).decode()
        server = self.server
        with server.lock:
            attempt = server.seen[key]
            server.seen[key] += 1
        if key in RAW_BODIES:
            payload = RAW_BODIES[key][0]
        elif key in HOSTILE:
            payload = completion(HOSTILE[key][0])
        elif key == "junk_usage":  # a fine answer whose token counts are junk: ok, counted as 0
            payload = completion(judgement("1"), {"prompt_tokens": "many", "completion_tokens": 1e308})
        elif key == "late":
            payload = b"not json at all" if attempt == 0 else VALID_BODY
        else:
            payload = completion(judgement("4"), {"prompt_tokens": 10, "completion_tokens": 5})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture(scope="module")
def crafted_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.lock, server.seen = threading.Lock(), Counter()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_openai_judge_hostile_answers_are_per_item_parse_errors(crafted_server):
    port = crafted_server.server_address[1]
    judge = OpenAIJudge("fake", f"http://127.0.0.1:{port}/v1", max_attempts=1, max_concurrency=4, max_retries=2,
                        timeout_s=30).setup()
    keys = ["good", *HOSTILE, *RAW_BODIES, "junk_usage", "late"]
    results = {r.key: r for r in judge.judge([JudgeItem(k, "t2i", f"case:{k}", img((i, 9, 9), size=8))
                                              for i, k in enumerate(keys)])}
    assert set(results) == set(keys)
    for key in ("good", "junk_usage", "late"):
        assert results[key].status == "ok", (key, results[key].error)
    assert results["late"].attempts == 2 and results["junk_usage"].scores["prompt_alignment"] == 1.0
    for case, (_, reason) in HOSTILE.items():
        assert (results[case].status, results[case].error) == ("parse_error", f"{reason} (after 3 attempts)"), case
    base = f"POST http://127.0.0.1:{port}/v1/chat/completions: "
    for case, (_, reason) in RAW_BODIES.items():
        r = results[case]
        assert r.status == "parse_error" and r.attempts == 3 and r.error.endswith("(after 3 attempts)"), case
        assert reason in r.error, (case, r.error)
        if case not in ("no_choices", "content_dict"):
            assert r.error.startswith(base), r.error
    assert results["no_choices"].raw.startswith("{'id': 'x'")  # what the server sent, for the record
    # every bad item asked exactly 3 times (1 + max_retries), the good ones once, "late" twice
    bad = [*HOSTILE, *RAW_BODIES]
    assert {k: crafted_server.seen[k] for k in keys} == {**{k: 3 for k in bad}, "good": 1, "junk_usage": 1,
                                                         "late": 2}
    assert judge.requests_sent == 3 * len(bad) + 4 and judge.retries == 0
    assert judge.prompt_tokens == 10 and judge.completion_tokens == 5  # junk usage counted as 0


def test_openai_generate_structured_hands_back_bad_answers(crafted_server):
    port = crafted_server.server_address[1]
    judge = OpenAIJudge("fake", f"http://127.0.0.1:{port}/v1", max_attempts=1)
    chats = [[{"role": "user", "content": f"case:{k}"}] for k in ("good", "html")]
    good, html = judge.generate_structured(chats, {"type": "object"})
    assert isinstance(good, str) and json.loads(good)["prompt_alignment"]["score"] == 4
    assert isinstance(html, BadAnswer) and html.raw == "<html>proxy login</html>"


# -- rewards: non-finite in, non-finite out --------------------------------------------------------------------
def test_lambda_harmonic_and_drs_never_clamp_non_finite_similarities():
    assert math.isnan(lambda_harmonic(INF, 0.2, 0.5))  # was 1 / (0.5/1 + 0.5/0.2) = 0.333...
    assert math.isnan(lambda_harmonic(None, INF, 0.0))  # was clamped to the best score, 1.0
    assert math.isnan(lambda_harmonic(0.5, -INF, 0.5)) and math.isnan(lambda_harmonic(NAN, 0.2, 1.0))
    assert lambda_harmonic(INF, 0.2, 0.0) == pytest.approx(0.2)  # λ = 0 does not use CLIP_I at all
    assert lambda_harmonic(1.7, -0.2, 0.0) == pytest.approx(1e-6)  # finite values are still clamped
    out = lambda_harmonic([0.8, INF, NAN], [0.2, 0.2, 0.2], 0.5)
    assert out[0] == pytest.approx(0.32) and math.isnan(out[1]) and math.isnan(out[2])
    assert math.isnan(drs_sharpen(INF, 2)) and math.isnan(drs_sharpen(-INF, 2))  # not σ(±∞) = 1 / 0
    sharp = drs_sharpen([0.7, NAN], 2)
    assert sharp[0] == pytest.approx(1 / (1 + math.exp(-0.5))) and math.isnan(sharp[1])
    assert math.isnan(drs_clip_i([0.9, INF])) and drs_clip_i([]) is None


# -- the labelling stage ---------------------------------------------------------------------------------------
class FakeScorer:
    """CLIP stand-in: the similarities of each item come from the script entry named in its text."""

    scorer_id = "fake-clip"

    def __init__(self, script):
        self.script = script

    def score(self, images, texts, references=None):
        out = []
        for text, refs in zip(texts, references or [[]] * len(texts)):
            clip_t, per_ref = self.script[text.split("case:")[1]]
            per_ref = per_ref[: len(refs)]
            out.append(ClipScores(clip_t=clip_t, clip_i=sum(per_ref) / len(per_ref) if per_ref else None,
                                  clip_i_per_ref=list(per_ref)))
        return out


class ScriptedJudge(_JudgeBase):
    """The real driver and parser over scripted answers (valid unless the key says ``parse``)."""

    def __init__(self):
        self.model_ref, self.batch_size, self.max_retries, self.feedback_max_chars, self.rubric_dir = (
            "scripted", 8, 1, 120, None)

    def _generate(self, items, rubric, attempt, batch_index):
        out = []
        for it in items:
            if "parse" in it.text:
                out.append(judgement(HUGE))
            else:
                out.append(json.dumps({d: {"score": 3, "feedback": "fine"} for d in rubric.dimension_names}))
        return out


CLIP_SCRIPT = {
    "fine": (0.3, []),
    "nan_t": (NAN, []),
    "inf_t": (INF, []),
    "neg_inf_t": (-INF, []),
    "mr_fine": (0.3, [0.7, 0.6]),
    "mr_inf_ref": (0.3, [0.7, INF]),
    "edit_nan_ref": (0.3, [NAN]),
    "pref_nan": (0.3, []),
    "parse_nan": (NAN, []),
}
TASKS = {"mr_fine": "multi_ref", "mr_inf_ref": "multi_ref", "edit_nan_ref": "edit"}


def _rows(keys):
    return [{"candidate_id": k, "prompt_id": f"p_{TASKS.get(k, 't2i')}", "task": TASKS.get(k, "t2i"),
             "text": f"case:{k}"} for k in keys]


class FakePreference:
    def score(self, images, texts, references):
        return [ClipScores(clip_t=NAN if "pref_nan" in t else 0.25) for t in texts]


def test_stage_non_finite_rewards_are_reward_errors(monkeypatch):
    keys = list(CLIP_SCRIPT) + ["noimg"]
    rows = _rows(keys)
    images = {k: img() for k in CLIP_SCRIPT}
    images["noimg"] = None
    refs = [img((0, 200, 0)), img((0, 0, 200))]
    stage = LabelingStage(ScriptedJudge(), FakeScorer({**CLIP_SCRIPT, "noimg": (0.3, [])}),
                          drs={"enabled": True, "tau": 0.65}, preference_scorer=FakePreference())
    out = {r["candidate_id"]: r for r in stage.process_batch(
        rows, images, {"p_edit": img((9, 9, 9))}, {"p_multi_ref": refs})}
    status = {k: r["status"] for k, r in out.items()}
    assert status == {"fine": "ok", "mr_fine": "ok", "nan_t": "reward_error", "inf_t": "reward_error",
                      "neg_inf_t": "reward_error", "mr_inf_ref": "reward_error", "edit_nan_ref": "reward_error",
                      "pref_nan": "reward_error", "parse_nan": "parse_error", "noimg": "image_error"}
    prefix = "non-finite reward value(s): "
    assert out["nan_t"]["error"] == prefix + "clip_t=nan, lambda_harmonic=nan, reward=nan"
    assert out["inf_t"]["error"] == prefix + "clip_t=inf, lambda_harmonic=nan, reward=nan"  # not clamped to 1
    assert out["neg_inf_t"]["error"] == prefix + "clip_t=-inf, lambda_harmonic=nan, reward=nan"
    assert out["mr_inf_ref"]["error"] == prefix + "clip_i=inf, clip_i_per_ref[1]=inf, lambda_harmonic=nan, reward=nan"
    assert out["edit_nan_ref"]["error"] == prefix + "clip_i=nan, clip_i_per_ref[0]=nan, lambda_harmonic=nan, reward=nan"
    assert out["pref_nan"]["error"] == prefix + "preference_score=nan"
    assert out["parse_nan"]["error"] == "number with 5001 digits (more than 32) (after 2 attempts)"
    for k in ("nan_t", "inf_t", "neg_inf_t", "mr_inf_ref", "edit_nan_ref", "pref_nan"):
        assert out[k]["reward"] is None, k  # no reward, so nothing downstream ranks it
        assert out[k]["visual_quality"] == 3.0  # the judgement is kept
    assert out["inf_t"]["clip_t"] == INF and math.isnan(out["inf_t"]["lambda_harmonic"])  # stored as it came
    for k in ("fine", "mr_fine"):
        assert out[k]["error"] is None and math.isfinite(out[k]["reward"]) and 0 <= out[k]["reward"] <= 1
    assert out["pref_nan"]["lambda_harmonic"] == pytest.approx(0.3) and math.isnan(out["pref_nan"]["preference_score"])

    # the table: contract holds (no ok row holds a NaN/inf), statuses counted, corpus drops by reason
    table = pl.DataFrame(list(out.values()), schema=label_schema())
    task_by_prompt = {"p_t2i": "t2i", "p_multi_ref": "multi_ref", "p_edit": "edit"}
    assert label_problems(table, task_by_prompt) == []
    assert status_counts(table) == {"ok": 2, "parse_error": 1, "image_error": 1, "reward_error": 6}
    assert parse_error_rate(table) == pytest.approx(1 / 9)  # reward_error rows were judged
    drops = Counter(judge_failure(row)[1] for row in table.iter_rows(named=True) if not judge_failure(row)[0])
    assert drops == {"label_reward_error": 6, "label_parse_error": 1, "label_image_error": 1}
    pairs, pair_drops = select_pairs(table.with_columns(pl.lit("p").alias("prompt_id")))
    assert pair_drops["not_ok"] == 8 and pairs.height == 1


def test_stage_non_finite_judge_score_and_clip_only_stage():
    class NanJudge:  # a backend that skipped validation: the stage still catches it
        def judge_id_for(self, task):
            return "nan-judge"

        def judge(self, items):
            return [JudgeResult(it.key, "ok", scores={"prompt_alignment": 3.0, "visual_quality": 4.0,
                                                      "aesthetics": NAN if "nan_t" in it.text else 2.0},
                                feedback={}, raw="{}", attempts=1) for it in items]

    rows = _rows(["fine", "nan_t"])
    out = LabelingStage(NanJudge(), None).process_batch(rows, {"fine": img(), "nan_t": img()})
    assert [r["status"] for r in out] == ["ok", "reward_error"]
    assert out[0]["reward"] == pytest.approx((3 + 4 + 2) / 3 / 5)  # judge only: the judge carries the weight
    assert out[1]["error"] == "non-finite reward value(s): aesthetics=nan, reward=nan" and out[1]["reward"] is None

    clip_only = LabelingStage(None, FakeScorer(CLIP_SCRIPT)).process_batch(
        _rows(["fine", "inf_t"]), {"fine": img(), "inf_t": img()})
    assert [r["status"] for r in clip_only] == ["ok", "reward_error"]
    assert clip_only[0]["reward"] == pytest.approx(0.3)
    assert clip_only[1]["error"] == "non-finite reward value(s): clip_t=inf, lambda_harmonic=nan, reward=nan"


# -- the contract check fails on any non-finite value in an ok row ---------------------------------------------
def test_label_problems_reports_non_finite_values_in_ok_rows():
    out = LabelingStage(ScriptedJudge(), FakeScorer(CLIP_SCRIPT)).process_batch(
        _rows(["fine", "mr_fine", "nan_t"]), {"fine": img(), "mr_fine": img(), "nan_t": img()},
        {}, {"p_multi_ref": [img(), img((1, 2, 3))]})
    table = pl.DataFrame(out, schema=label_schema())
    task_by_prompt = {"p_t2i": "t2i", "p_multi_ref": "multi_ref"}
    assert label_problems(table, task_by_prompt) == []  # the reward_error row has its NaNs: not an ok row
    broken = table.with_columns(
        pl.when(pl.col("candidate_id") == "fine").then(float("inf")).otherwise(pl.col("clip_t")).alias("clip_t"),
        pl.when(pl.col("candidate_id") == "fine").then(float("nan")).otherwise(pl.col("reward")).alias("reward"),
        pl.when(pl.col("candidate_id") == "mr_fine").then(pl.lit([0.5, float("nan")]))
        .otherwise(pl.col("clip_i_per_ref")).alias("clip_i_per_ref"),
    )
    problems = label_problems(broken, task_by_prompt)
    assert problems == ["2 ok rows with non-finite values (they should be reward_error), e.g. "
                        "['fine: clip_t=inf, reward=nan', 'mr_fine: clip_i_per_ref[1]=nan']"]
    # a corpus never ranks such a row: its reward is missing, and pairs skip it
    assert judge_failure({"status": "ok", "reward": float("inf")}) == (False, MISSING_REWARD)
    assert judge_failure({"status": "reward_error", "reward": None}) == (False, "label_reward_error")
