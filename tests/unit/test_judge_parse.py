"""Rubrics, the judgement schema, the parser, prompts and the judge driver's retry logic (no model needed)."""

import json
import re

import pytest
from PIL import Image

from labelers.hashing import content_id
from labelers.judge import (
    JudgeItem,
    JudgementParseError,
    _JudgeBase,
    build_messages,
    build_vllm_requests,
    judge_id,
    judgement_schema,
    message_images,
    parse_judgement,
)
from labelers.rubrics import all_dimensions, load_rubric

T2I = load_rubric("t2i")


def valid(rubric=T2I, **override):
    obj = {d: {"score": 3, "feedback": f"{d} is fine."} for d in rubric.dimension_names}
    obj.update(override)
    return json.dumps(obj)


# -- rubrics --------------------------------------------------------------------------------------------------
def test_rubrics_dimensions_and_versions():
    assert load_rubric("t2i").dimension_names == ("prompt_alignment", "visual_quality", "aesthetics")
    assert load_rubric("edit").dimension_names == ("instruction_following", "detail_preservation", "visual_quality")
    assert load_rubric("multi_ref").dimension_names == ("reference_fidelity", "prompt_alignment", "visual_quality")
    assert all_dimensions() == [
        "prompt_alignment", "visual_quality", "aesthetics",
        "instruction_following", "detail_preservation", "reference_fidelity",
    ]
    for task in ("t2i", "edit", "multi_ref"):
        r = load_rubric(task)
        assert r.task == task and r.version and r.system
        assert len(r.fingerprint) == 32
    fps = {load_rubric(t).fingerprint for t in ("t2i", "edit", "multi_ref")}
    assert len(fps) == 3
    with pytest.raises(ValueError):
        load_rubric("video")


def test_rubric_fingerprint_is_content_hash(tmp_path):
    src = (load_rubric.__globals__["RUBRIC_DIR"] / "t2i.yaml").read_text()
    (tmp_path / "t2i.yaml").write_text("# a comment does not change the content\n" + src)
    assert load_rubric("t2i", tmp_path).fingerprint == T2I.fingerprint
    other = tmp_path / "other"
    other.mkdir()
    (other / "t2i.yaml").write_text(src.replace("version: 1", "version: 2"))
    assert load_rubric("t2i", other).fingerprint != T2I.fingerprint


# -- schema ---------------------------------------------------------------------------------------------------
def test_schema_shape():
    schema = judgement_schema(T2I)
    assert schema["type"] == "object"
    assert list(schema["properties"]) == list(T2I.dimension_names)
    assert schema["required"] == list(T2I.dimension_names)
    assert schema["additionalProperties"] is False
    for dim in T2I.dimension_names:
        prop = schema["properties"][dim]
        assert prop["required"] == ["score", "feedback"] and prop["additionalProperties"] is False
        assert prop["properties"]["score"] == {"type": "integer", "minimum": 0, "maximum": 5}
        fb = prop["properties"]["feedback"]
        assert fb == {"type": "string", "pattern": '^[^\\x00-\\x1f"\\\\]{1,120}$'}
    fb40 = judgement_schema(T2I, feedback_max_chars=40)["properties"]["aesthetics"]["properties"]["feedback"]
    assert re.fullmatch(fb40["pattern"], "x" * 40) and not re.fullmatch(fb40["pattern"], "x" * 41)
    for bad in ("", "tab\there", 'a "quote"', "back\\slash", "new\nline"):
        assert not re.fullmatch(fb40["pattern"], bad)
    assert re.fullmatch(fb40["pattern"], "Très bien, 4/5 — ok!")


# -- parser ---------------------------------------------------------------------------------------------------
def test_parse_valid():
    raw = json.dumps({
        "prompt_alignment": {"score": 4, "feedback": "The cube is there."},
        "visual_quality": {"score": 0, "feedback": "  Blurry\tand\nnoisy. "},
        "aesthetics": {"score": 2.0, "feedback": "Meh."},  # an integral number is an integer (JSON Schema)
    })
    scores, feedback = parse_judgement(raw, T2I)
    assert scores == {"prompt_alignment": 4.0, "visual_quality": 0.0, "aesthetics": 2.0}
    assert all(isinstance(v, float) for v in scores.values())
    assert feedback["visual_quality"] == "Blurry and noisy."
    # a Markdown fence around the JSON (unconstrained endpoints) is tolerated
    assert parse_judgement("```json\n" + valid() + "\n```", T2I)[0]["aesthetics"] == 3.0


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("", "empty output"),
        ("   ", "empty output"),
        ("I think the image is great!", "not JSON"),
        ("<|im_end|> {", "not JSON"),
        ('{"prompt_alignment": {"score": 3, "feedback": "ok', "truncated"),
        ('{"prompt_alignment": {"score": 3, "feedback": "ok"}, ', "truncated"),
        ('{"prompt_alignment": {"score": 3', "truncated"),
        ("[1, 2, 3]", "expected a JSON object"),
        ('"just a string"', "expected a JSON object"),
    ],
)
def test_parse_rejects_non_judgements(raw, reason):
    with pytest.raises(JudgementParseError) as exc:
        parse_judgement(raw, T2I)
    assert reason in exc.value.reason


def test_parse_rejects_bad_content():
    def reason(raw):
        with pytest.raises(JudgementParseError) as exc:
            parse_judgement(raw, T2I)
        return exc.value.reason

    assert "outside [0, 5]" in reason(valid(aesthetics={"score": 6, "feedback": "x"}))
    assert "outside [0, 5]" in reason(valid(aesthetics={"score": -1, "feedback": "x"}))
    assert "outside [0, 5]" in reason(valid(aesthetics={"score": 5.01, "feedback": "x"}))
    assert "not a number" in reason(valid(aesthetics={"score": "4", "feedback": "x"}))
    assert "not a number" in reason(valid(aesthetics={"score": True, "feedback": "x"}))
    assert "not a number" in reason(valid(aesthetics={"score": None, "feedback": "x"}))
    assert "non-finite number NaN" in reason(valid().replace('"score": 3', '"score": NaN', 1))
    assert "score 2.5 is not an integer" in reason(valid(aesthetics={"score": 2.5, "feedback": "x"}))
    assert "unexpected key(s) ['overall']" in reason(valid(overall={"score": 3, "feedback": "x"}))
    obj = json.loads(valid())
    del obj["visual_quality"]
    assert "missing dimension(s) ['visual_quality']" in reason(json.dumps(obj))
    assert "missing field(s) ['feedback']" in reason(valid(aesthetics={"score": 3}))
    assert "unexpected field(s) ['why']" in reason(valid(aesthetics={"score": 3, "feedback": "x", "why": "y"}))
    assert "feedback is int" in reason(valid(aesthetics={"score": 3, "feedback": 7}))
    assert "expected an object" in reason(valid(aesthetics=3))
    dup = '{"aesthetics": {"score": 1, "feedback": "a"}, ' + valid()[1:]
    assert "duplicate key" in reason(dup)
    # another task's dimensions are missing/unexpected for this rubric
    edit = load_rubric("edit")
    assert "missing dimension" in reason(valid(edit))


def test_parse_is_pure():
    raw = valid()
    assert parse_judgement(raw, T2I) == parse_judgement(raw, T2I)


# -- ids and prompts ------------------------------------------------------------------------------------------
def test_judge_id():
    jid = judge_id("zoo:judge", T2I)
    assert jid == judge_id("zoo:judge", load_rubric("t2i")) and len(jid) == 32
    assert jid != judge_id("Qwen/Qwen2.5-VL-7B-Instruct", T2I)
    assert jid != judge_id("zoo:judge", load_rubric("edit"))
    assert jid == content_id("judge", "zoo:judge", "t2i", T2I.version, T2I.fingerprint)


def _img(color):
    return Image.new("RGB", (16, 16), color)


def test_build_messages_shared_prefix_and_image_order():
    a = build_messages(JudgeItem("a", "t2i", "a red cube", _img("red")), T2I)
    b = build_messages(JudgeItem("b", "t2i", "a blue ball", _img("blue")), T2I)
    assert a[0] == b[0] and a[0]["role"] == "system"  # identical system message -> shared prefix
    system_text = a[0]["content"][0]["text"]
    assert T2I.system in system_text and "at most 120 characters" in system_text
    assert json.dumps(judgement_schema(T2I), separators=(",", ":")) in system_text
    assert all(d in system_text for d in T2I.dimension_names)
    assert "a red cube" in json.dumps(a[1]["content"], default=str)

    src, out = _img("green"), _img("white")
    edit = build_messages(JudgeItem("e", "edit", "make it white", out, source_image=src), load_rubric("edit"))
    assert message_images(edit) == [src, out]
    refs = [_img("black"), _img("gray")]
    mr = build_messages(
        JudgeItem("m", "multi_ref", "the cat in the room", out, reference_images=refs,
                  reference_types=["subject", "background"]),
        load_rubric("multi_ref"),
    )
    assert message_images(mr) == refs + [out]
    user_text = " ".join(p["text"] for p in mr[1]["content"] if p["type"] == "text")
    assert "Reference 1 (subject)" in user_text and "Reference 2 (background)" in user_text


class _EchoTemplate:
    """Stand-in processor: renders messages the way a chat template would (images as placeholders)."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        parts = []
        for m in messages:
            body = "".join("<image>" if p["type"] == "image" else p["text"] for p in m["content"])
            parts.append(f"<{m['role']}>{body}</{m['role']}>")
        return "".join(parts) + ("<assistant>" if add_generation_prompt else "")


def test_build_vllm_requests_is_pure():
    img1, img2, src = _img("red"), _img("blue"), _img("green")
    reqs = build_vllm_requests(
        [JudgeItem("a", "t2i", "a red cube", img1), JudgeItem("b", "t2i", "a blue ball", img2)], T2I, _EchoTemplate()
    )
    assert [r["multi_modal_data"]["image"] for r in reqs] == [img1, img2]
    assert reqs[0]["prompt"].endswith("<assistant>") and "a red cube" in reqs[0]["prompt"]
    shared = reqs[0]["prompt"].split("</system>")[0]
    assert reqs[1]["prompt"].startswith(shared)
    edit = build_vllm_requests([JudgeItem("e", "edit", "x", img1, source_image=src)], load_rubric("edit"),
                               _EchoTemplate())
    assert edit[0]["multi_modal_data"]["image"] == [src, img1]
    assert edit[0]["prompt"].count("<image>") == 2


# -- the driver: image errors, retries, parse errors ----------------------------------------------------------
class ScriptedJudge(_JudgeBase):
    """A judge whose 'model' replays scripted outputs per key and attempt."""

    def __init__(self, script, max_retries=2, batch_size=2):
        self.script, self.max_retries, self.batch_size = script, max_retries, batch_size
        self.model_ref, self.feedback_max_chars, self.rubric_dir = "scripted", 120, None
        self.calls = []

    def _generate(self, items, rubric, attempt, batch_index):
        self.calls.append((attempt, [it.key for it in items]))
        return [self.script[it.key][min(attempt, len(self.script[it.key]) - 1)] for it in items]


def test_driver_retries_then_reports_parse_error():
    script = {
        "good": [valid()],
        "late": ["garbage", '{"prompt_alignment": ', valid()],
        "bad": ["garbage", "still garbage", valid(aesthetics={"score": 9, "feedback": "x"})],
    }
    judge = ScriptedJudge(script)
    items = [
        JudgeItem("good", "t2i", "p", _img("red")),
        JudgeItem("noimg", "t2i", "p", None),
        JudgeItem("late", "t2i", "p", _img("red")),
        JudgeItem("bad", "t2i", "p", _img("red")),
        JudgeItem("broken", "t2i", "p", b"not an image"),
    ]
    res = judge.judge(items)
    assert [r.key for r in res] == ["good", "noimg", "late", "bad", "broken"]
    assert [r.status for r in res] == ["ok", "image_error", "ok", "parse_error", "image_error"]
    assert res[0].attempts == 1 and res[2].attempts == 3
    assert res[1].error == "missing image" and res[1].scores == {} and res[1].attempts == 0
    assert "unreadable image" in res[4].error
    bad = res[3]
    assert bad.scores == {} and bad.raw == script["bad"][2]
    assert bad.error == "aesthetics: score 9 outside [0, 5] (after 3 attempts)"
    # only failures are regenerated, batched; image errors never reach the model
    assert judge.calls[0] == (0, ["good", "late"]) and judge.calls[1] == (0, ["bad"])
    assert judge.calls[2] == (1, ["late", "bad"]) and judge.calls[3] == (2, ["late", "bad"])
    assert all("noimg" not in keys and "broken" not in keys for _, keys in judge.calls)


def test_driver_groups_by_task_and_requires_sources():
    rub_edit = load_rubric("edit")
    script = {"t": [valid()], "e": [valid(rub_edit)], "e2": [valid(rub_edit)]}
    judge = ScriptedJudge(script, max_retries=0, batch_size=8)
    res = judge.judge([
        JudgeItem("t", "t2i", "p", _img("red")),
        JudgeItem("e", "edit", "p", _img("red"), source_image=_img("blue")),
        JudgeItem("e2", "edit", "p", _img("red"), source_image=None),
        JudgeItem("m", "multi_ref", "p", _img("red"), reference_images=()),
    ])
    assert [r.status for r in res] == ["ok", "ok", "image_error", "image_error"]
    assert res[2].error == "missing source image" and "without reference" in res[3].error
    assert [keys for _, keys in judge.calls] == [["t"], ["e"]]
    assert judge.judge_id_for("edit") == judge_id("scripted", rub_edit)
