"""Pairwise judging: schema, prompt, parser, order-consistency, retries, verdicts -> BT pairs; one real tiny-model run."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from labelers.judge import JudgementParseError, feedback_pattern, message_images
from labelers.pairs import PAIR_COLUMNS, pairs_schema
from labelers.pairwise import (
    DROP_REASONS,
    PairItem,
    PairVerdict,
    PairwiseJudge,
    build_pairwise_messages,
    combine_orders,
    fit_prompt_strengths,
    pairwise_judge_id,
    pairwise_schema,
    parse_verdict,
    verdicts_to_pairs,
)
from labelers.rubrics import load_rubric

RED, BLUE = (255, 0, 0), (0, 0, 255)


def img(colour, size=16):
    return Image.new("RGB", (size, size), colour)


def answer(verdict, reason="looks better"):
    return json.dumps({"verdict": verdict, "reason": reason})


# -- schema, parser, prompt -------------------------------------------------------------------------------------
def test_schema_shape():
    schema = pairwise_schema()
    assert schema["required"] == ["verdict", "reason"] and schema["additionalProperties"] is False
    assert schema["properties"]["verdict"] == {"type": "string", "enum": ["A", "B", "tie"]}
    assert schema["properties"]["reason"] == {"type": "string", "pattern": feedback_pattern(120)}
    pattern = pairwise_schema(max_reason_chars=30)["properties"]["reason"]["pattern"]
    assert re.fullmatch(pattern, "x" * 30) and not re.fullmatch(pattern, "x" * 31)
    assert not re.fullmatch(pattern, 'a "quote"') and not re.fullmatch(pattern, "tab\there")


@pytest.mark.parametrize("raw,expected", [
    ('{"verdict": "A", "reason": "sharper"}', ("A", "sharper")),
    ('{"verdict":"B","reason":"follows the prompt"}', ("B", "follows the prompt")),
    ('{"verdict": "tie", "reason": "same"}', ("tie", "same")),
    ('  {"verdict": "a", "reason": "x"}\n', ("A", "x")),  # case and whitespace tolerated
    ('{"verdict": "TIE", "reason": "x"}', ("tie", "x")),
    ('```json\n{"verdict": "B", "reason": "x"}\n```', ("B", "x")),  # a Markdown fence (OpenAI-style)
    ('{"verdict": "A", "reason": "two\tlines\nhere"}', ("A", "two lines here")),  # control chars collapsed
])
def test_parse_verdict_valid(raw, expected):
    assert parse_verdict(raw) == expected


@pytest.mark.parametrize("raw,reason", [
    ("", "empty output"),
    ("   ", "empty output"),
    ("A", "not JSON"),
    ("I prefer image A.", "not JSON"),
    ('{"verdict": "A", "reason": "trunc', "truncated JSON"),
    ('{"verdict": "A"', "truncated JSON"),
    ('["A", "why"]', "expected a JSON object"),
    ('{"verdict": "C", "reason": "x"}', "not one of"),
    ('{"verdict": "both", "reason": "x"}', "not one of"),
    ('{"verdict": 1, "reason": "x"}', "not a string"),
    ('{"verdict": "A"}', "missing key(s) ['reason']"),
    ('{"reason": "x"}', "missing key(s) ['verdict']"),
    ('{"verdict": "A", "reason": 3}', "reason is int"),
    ('{"verdict": "A", "reason": "x", "score": 5}', "unexpected key(s) ['score']"),
    ('{"verdict": "A", "verdict": "B", "reason": "x"}', "duplicate key 'verdict'"),
])
def test_parse_verdict_garbage(raw, reason):
    with pytest.raises(JudgementParseError) as e:
        parse_verdict(raw)
    assert reason in e.value.reason
    with pytest.raises(JudgementParseError):
        parse_verdict(None)


def test_messages_order_images_and_share_the_system_prompt():
    a, b, src = img(RED), img(BLUE), img((0, 255, 0))
    t2i = load_rubric("t2i")
    m1 = build_pairwise_messages("t2i", "a red cube", a, b, rubric=t2i)
    m2 = build_pairwise_messages("t2i", "a blue ball", b, a)
    assert m1[0] == m2[0] and m1[0]["role"] == "system"  # identical system message -> shared prefix
    system = m1[0]["content"][0]["text"]
    assert t2i.system.splitlines()[0] in system and all(d in system for d in t2i.dimension_names)
    assert json.dumps(pairwise_schema(), separators=(",", ":")) in system and "at most 120 characters" in system
    assert message_images(m1) == [a, b] and message_images(m2) == [b, a]
    user = " ".join(p["text"] for p in m1[1]["content"] if p["type"] == "text")
    assert "Image A:" in user and "Image B:" in user and "a red cube" in user
    edit = build_pairwise_messages("edit", "make it blue", a, b, source_image=src)
    assert message_images(edit) == [src, a, b]
    assert edit[0] != m1[0] and "source image" in edit[0]["content"][0]["text"]
    refs = [img((1, 1, 1)), img((2, 2, 2))]
    mr = build_pairwise_messages("multi_ref", "the cat", a, b, reference_images=refs,
                                 reference_types=["subject", "style"])
    assert message_images(mr) == refs + [a, b]
    user = " ".join(p["text"] for p in mr[1]["content"] if p["type"] == "text")
    assert "Reference 1 (subject)" in user and "Reference 2 (style)" in user


def test_combine_orders():
    assert combine_orders("A", "B") == ("first", True)
    assert combine_orders("B", "A") == ("second", True)
    assert combine_orders("tie", "tie") == ("tie", True)
    assert combine_orders("A", "A") == ("tie", False)  # position preference, not an image preference
    assert combine_orders("B", "B") == ("tie", False)
    assert combine_orders("A", "tie") == ("first", False)
    assert combine_orders("tie", "A") == ("second", False)


# -- the driver with a scripted backend -------------------------------------------------------------------------
class ScriptedBackend:
    """Answers per (pair text, order, attempt); order "ab" when the red (first) image is shown as Image A."""

    max_retries = 2

    def __init__(self, script):
        self.script, self.calls = script, []

    def judge_id_for(self, task):
        return f"scripted-{task}"

    def generate_structured(self, messages_list, schema, attempt=0, seed=0):
        assert schema == pairwise_schema()
        keys = []
        for m in messages_list:
            text = next(p["text"] for p in m[1]["content"] if p["type"] == "text" and "Prompt:" in p["text"])
            key = text.split("Prompt: ")[1].split("\n")[0]
            order = "ab" if message_images(m)[-2].getpixel((0, 0)) == RED else "ba"
            keys.append((key, order))
        self.calls.append((attempt, keys))
        return [self.script[k][min(attempt, len(self.script[k]) - 1)] for k in keys]


def pair(key, prompt_id="p", id_a=None, id_b=None, first=None):
    return PairItem(key, "t2i", key, img(RED) if first is None else first, img(BLUE), prompt_id=prompt_id,
                    id_a=id_a or f"{key}-a", id_b=id_b or f"{key}-b")


def test_compare_order_consistency_and_retries():
    script = {
        ("consistent", "ab"): [answer("A")], ("consistent", "ba"): [answer("B")],
        ("second", "ab"): [answer("B")], ("second", "ba"): [answer("A")],
        ("position", "ab"): [answer("A")], ("position", "ba"): [answer("A")],
        ("ties", "ab"): [answer("tie")], ("ties", "ba"): [answer("tie")],
        ("late", "ab"): ["garbage", answer("A")], ("late", "ba"): [answer("B")],
        ("broken", "ab"): [answer("A")], ("broken", "ba"): ["nope", '{"verdict": "A"', '{"verdict": "X", "reason": "r"}'],
    }
    backend = ScriptedBackend(script)
    judge = PairwiseJudge(backend)
    items = [pair("consistent"), pair("second"), pair("position"), pair("ties"),
             pair("noimg", first=b"not an image"), pair("late"), pair("broken")]
    res = judge.compare(items)
    assert [r.key for r in res] == [it.key for it in items]
    by = {r.key: r for r in res}
    assert (by["consistent"].verdict, by["consistent"].consistent, by["consistent"].status) == ("first", True, "ok")
    assert by["consistent"].answer_ab == "A" and by["consistent"].answer_ba == "B"
    assert by["consistent"].reason_ab == "looks better" and json.loads(by["consistent"].raw_ba)["verdict"] == "B"
    assert (by["second"].verdict, by["second"].consistent) == ("second", True)
    assert (by["position"].verdict, by["position"].consistent) == ("tie", False)
    assert (by["ties"].verdict, by["ties"].consistent) == ("tie", True)
    assert by["noimg"].status == "image_error" and "unreadable image A" in by["noimg"].error
    assert by["noimg"].attempts == 0 and by["noimg"].id_a == "noimg-a"  # ids survive for the drops
    assert (by["late"].status, by["late"].verdict, by["late"].attempts) == ("ok", "first", 2)
    broken = by["broken"]
    assert broken.status == "parse_error" and broken.verdict is None and broken.attempts == 3
    assert broken.error == "order BA: verdict 'X' is not one of 'A', 'B', 'tie' (after 3 attempts)"
    assert broken.raw_ab == answer("A")
    # one batched call per attempt with both orders of every readable pair; retries only regenerate failures
    assert len(backend.calls) == 3
    assert len(backend.calls[0][1]) == 12 and ("noimg", "ab") not in backend.calls[0][1]
    assert backend.calls[0][1][:2] == [("consistent", "ab"), ("consistent", "ba")]
    assert backend.calls[1] == (1, [("late", "ab"), ("broken", "ba")])
    assert backend.calls[2] == (2, [("broken", "ba")])


def test_judge_ids_and_backend_requirements():
    backend = ScriptedBackend({})
    judge = PairwiseJudge(backend)
    assert judge.max_retries == 2 and PairwiseJudge(backend, max_retries=0).max_retries == 0
    jid = pairwise_judge_id(backend, "t2i")
    assert judge.judge_id_for("t2i") == jid == pairwise_judge_id(backend, "t2i") and len(jid) == 32
    assert jid != pairwise_judge_id(backend, "edit")
    assert jid != pairwise_judge_id(backend, "t2i", max_reason_chars=60)
    other = ScriptedBackend({})
    other.judge_id_for = lambda task: "another-model"
    assert pairwise_judge_id(other, "t2i") != jid
    with pytest.raises(TypeError):
        PairwiseJudge(object())


# -- verdicts -> pairs --------------------------------------------------------------------------------------------
def verdict(key, a, b, ab, ba, prompt_id="p", status="ok"):
    if status != "ok":
        return PairVerdict(key, status, prompt_id=prompt_id, id_a=a, id_b=b, error="x")
    v, consistent = combine_orders(ab, ba)
    return PairVerdict(key, "ok", verdict=v, consistent=consistent, answer_ab=ab, answer_ba=ba,
                       prompt_id=prompt_id, id_a=a, id_b=b)


def test_verdicts_to_pairs_columns_probabilities_and_drops():
    verdicts = [
        verdict("1", "x", "y", "A", "B"),   # x > y
        verdict("2", "y", "z", "A", "B"),   # y > z
        verdict("3", "z", "x", "B", "A"),   # x > z (second wins)
        verdict("4", "x", "y", "A", "B"),   # x > y again: duplicate pair
        verdict("5", "u", "v", "A", "A", prompt_id="q"),      # position preference: inconsistent tie
        verdict("6", "u", "w", "tie", "tie", prompt_id="q"),  # consistent tie: kept as 0.5
        verdict("7", "v", "w", "A", "tie", prompt_id="q"),    # half-consistent win
        verdict("8", "v", "w", None, None, prompt_id="q", status="parse_error"),
        verdict("9", "v", "u", None, None, prompt_id="q", status="image_error"),
    ]
    pairs, drops = verdicts_to_pairs(verdicts)
    assert tuple(pairs.columns) == PAIR_COLUMNS and dict(pairs.schema) == pairs_schema()
    assert set(drops) == set(DROP_REASONS)
    assert drops == {**{r: 0 for r in DROP_REASONS}, "duplicate": 1, "inconsistent_tie": 1, "inconsistent_win": 1,
                     "parse_error": 1, "image_error": 1}
    rows = {(r["chosen_id"], r["rejected_id"]): r for r in pairs.to_dicts()}
    assert set(rows) == {("x", "y"), ("y", "z"), ("x", "z"), ("u", "w")} or set(rows) == {
        ("x", "y"), ("y", "z"), ("x", "z"), ("w", "u")}
    assert (pairs["strategy"] == "pairwise_judge").all()
    assert (pairs["p_chosen"] >= 0.5).all()
    strengths = fit_prompt_strengths(verdicts)
    s = strengths["p"].as_dict()
    assert s["x"] > s["y"] > s["z"] and sum(s.values()) == pytest.approx(0.0, abs=1e-9)
    for (c, r), row in rows.items():
        if row["prompt_id"] == "p":
            assert row["label"] == 1.0
            assert row["margin"] == pytest.approx(s[c] - s[r])
            assert row["p_chosen"] == pytest.approx(1 / (1 + np.exp(-(s[c] - s[r]))))
    tie_row = next(row for row in rows.values() if row["prompt_id"] == "q")
    assert tie_row["label"] == 0.5 and tie_row["p_chosen"] >= 0.5 and tie_row["margin"] >= 0
    assert len(set(pairs["pair_id"])) == pairs.height

    # policies: drop ties, keep half-consistent wins, explicit ids and strengths
    pairs2, drops2 = verdicts_to_pairs(verdicts, tie_policy="drop", require_consistent=False)
    assert drops2["tie"] == 1 and drops2["inconsistent_win"] == 0
    assert ("v", "w") in {(r["chosen_id"], r["rejected_id"]) for r in pairs2.to_dicts()}
    ids = [(v.prompt_id, v.id_a, v.id_b) for v in verdicts]
    bare = [PairVerdict(v.key, v.status, v.verdict, v.consistent, v.answer_ab, v.answer_ba) for v in verdicts]
    pairs3, _ = verdicts_to_pairs(bare, ids=ids, strengths={k: g.as_dict() for k, g in strengths.items()})
    assert pairs3.equals(pairs)
    with pytest.raises(ValueError):
        verdicts_to_pairs(bare)


def test_a_verdict_against_the_fitted_ranking():
    # intransitive judgements: x > y (judged twice, both kept as evidence), y > z, z > x
    verdicts = [verdict("1", "x", "y", "A", "B"), verdict("2", "y", "x", "B", "A"),
                verdict("3", "y", "z", "A", "B"), verdict("4", "z", "x", "A", "B")]
    s = fit_prompt_strengths(verdicts)["p"].as_dict()
    assert s["x"] > s["z"] > s["y"]  # x: 4 wins 2 losses, z: 2 and 2, y: 2 wins 4 losses
    pairs, drops = verdicts_to_pairs(verdicts)
    assert drops["duplicate"] == 1 and pairs.height == 3
    against = pairs.filter(pairs["p_chosen"] < 0.5)  # the judge's label, the fit's doubt
    assert against.select("chosen_id", "rejected_id").rows() == [("y", "z"), ("z", "x")]
    assert against["margin"][0] == pytest.approx(s["y"] - s["z"])
    pairs, drops = verdicts_to_pairs(verdicts, drop_contradicting=True)
    assert drops["contradicts_fit"] == 2 and pairs.select("chosen_id", "rejected_id").rows() == [("x", "y")]
    assert pairs["p_chosen"][0] > 0.5


# -- one real run on the tiny zoo judge -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pairwise():
    from labelers.judge import TransformersJudge

    return PairwiseJudge(TransformersJudge("zoo:judge", cpu_threads=1)).setup()


def test_real_tiny_judge_pairs(tiny_pairwise):
    imgs = [Image.new("RGB", (64, 64), ((37 * i) % 256, (91 * i) % 256, (53 * i + 40) % 256)) for i in range(4)]
    items = [
        PairItem("p0", "t2i", "a red cube", imgs[0], imgs[1], prompt_id="P0", id_a="c0", id_b="c1"),
        PairItem("p1", "edit", "make it blue", imgs[2], imgs[3], source_image=imgs[0], prompt_id="P1",
                 id_a="c2", id_b="c3"),
    ]
    res = tiny_pairwise.compare(items)
    assert [r.status for r in res] == ["ok", "ok"], [(r.error, r.raw_ab, r.raw_ba) for r in res]
    for r in res:
        assert r.verdict in {"first", "second", "tie"} and isinstance(r.consistent, bool)
        assert r.attempts == 1  # greedy + grammar: valid on the first try
        for raw in (r.raw_ab, r.raw_ba):
            data = json.loads(raw)  # strict JSON, not just parseable by our lenient parser
            assert data["verdict"] in {"A", "B", "tie"} and 1 <= len(data["reason"]) <= 120
    pairs, drops = verdicts_to_pairs(res)
    assert tuple(pairs.columns) == PAIR_COLUMNS
    assert pairs.height + sum(drops.values()) == 2
    assert tiny_pairwise.judge_id_for("t2i") != tiny_pairwise.backend.judge_id_for("t2i")

