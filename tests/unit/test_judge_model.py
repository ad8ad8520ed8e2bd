"""The tiny zoo judge and CLIP models: built offline, reloaded through the production loaders, run for real."""

import json

import pytest
from PIL import Image

from labelers.clip_scorer import ClipScorer
from labelers.judge import JudgeItem, TransformersJudge, build_vllm_requests, parse_judgement
from labelers.rubrics import all_dimensions, load_rubric
from labelers.stage import LabelingStage, label_columns
from pipelines.zoo.clip import build_clip
from pipelines.zoo.judge import build_judge


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo") / "judge"
    build_judge(out)
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo") / "clip"
    build_clip(out)
    return out


@pytest.fixture(scope="module")
def judge(judge_dir):
    # cpu_threads=1: on a shared 2-core CPU, OpenMP sync dominates a tiny model (10x slower with 2 threads)
    return TransformersJudge(str(judge_dir), batch_size=8, max_new_tokens=512, model_ref="zoo:judge",
                             cpu_threads=1).setup()


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return ClipScorer(str(clip_dir), backend="open_clip", batch_size=4, cpu_threads=1).setup()


def images(n, size=64):
    return [Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (53 * i + 40) % 256)) for i in range(n)]


def test_judge_dir_reloads_like_a_qwen_checkpoint(judge_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLForConditionalGeneration

    names = {p.name for p in judge_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "processor_config.json", "chat_template.jinja"} <= names
    processor = AutoProcessor.from_pretrained(judge_dir)
    model = AutoModelForImageTextToText.from_pretrained(judge_dir)
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    tok = processor.tokenizer
    assert 1500 <= len(tok) <= 4096 and model.config.text_config.vocab_size >= len(tok)
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert set(model.generation_config.eos_token_id) == {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    # Qwen2.5-VL chat template, and a 64x64 image is a handful of tokens (56x56 -> 4x4 patches -> 4 after merge)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")
    enc = processor(text=[text], images=images(1), return_tensors="pt")
    assert (enc["input_ids"] == cfg.image_token_id).sum().item() == 4
    # the byte-level BPE round-trips text, JSON included
    s = '{"prompt_alignment": {"score": 4, "feedback": "Un chat rouge, très joli."}}'
    assert tok.decode(tok(s)["input_ids"]) == s
    # a rebuild is identical (fixed seed, deterministic tokenizer training)
    from safetensors.torch import load_file

    again = judge_dir.parent / "judge_again"
    build_judge(again)
    a, b = load_file(judge_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (again / "tokenizer.json").read_text() == (judge_dir / "tokenizer.json").read_text()


def test_transformers_judge_grammar_makes_random_model_valid(judge):
    imgs = images(4)
    items = [JudgeItem(f"k{i}", "t2i", f"a photo of thing {i}", im) for i, im in enumerate(imgs)]
    items.insert(2, JudgeItem("missing", "t2i", "a photo", None))
    results = judge.judge(items)
    assert [r.key for r in results] == ["k0", "k1", "missing", "k2", "k3"]
    missing = results.pop(2)
    assert missing.status == "image_error" and missing.scores == {} and missing.attempts == 0
    rubric = load_rubric("t2i")
    for r in results:
        assert r.status == "ok", (r.error, r.raw)
        assert r.attempts == 1  # greedy + grammar: valid on the first try
        assert set(r.scores) == set(rubric.dimension_names) == set(r.feedback)
        for v in r.scores.values():
            assert v == int(v) and 0 <= v <= 5
        for fb in r.feedback.values():
            assert isinstance(fb, str) and len(fb) <= 120
        json.loads(r.raw)  # strictly valid JSON, not just parseable by our lenient parser
        assert parse_judgement(r.raw, rubric)[0] == r.scores
    assert judge.judge_id_for("t2i") != judge.judge_id_for("edit")


def test_transformers_judge_mixed_tasks_and_retry_sampling(judge):
    src, out = images(2)
    refs = images(3, size=48)
    items = [
        JudgeItem("e", "edit", "make it blue", out, source_image=src),
        JudgeItem("m", "multi_ref", "the subject in the scene", out, reference_images=refs,
                  reference_types=["subject", "background", "style"]),
    ]
    res = judge.judge(items)
    assert [r.status for r in res] == ["ok", "ok"], [(r.error, r.raw) for r in res]
    assert set(res[0].scores) == {"instruction_following", "detail_preservation", "visual_quality"}
    assert set(res[1].scores) == {"reference_fidelity", "prompt_alignment", "visual_quality"}
    # retries sample under the grammar too: still valid JSON
    raws = judge._generate([items[0]], load_rubric("edit"), attempt=1, batch_index=0)
    parse_judgement(raws[0], load_rubric("edit"))


def test_grammar_processor_masks(judge):
    import torch

    from labelers.judge import _make_grammar_processor

    rubric = load_rubric("t2i")
    stop = judge._stop_ids
    proc = _make_grammar_processor(judge.compiled_grammar(rubric), 2, judge._vocab_size, stop)
    logits = proc(torch.zeros((2, 5), dtype=torch.long), torch.zeros((2, judge._vocab_size)))
    allowed = torch.isfinite(logits)
    first = {judge.processor.tokenizer.decode([t]) for t in allowed[0].nonzero().flatten().tolist()}
    assert first and all('{"prompt_alignment"'.startswith(t) for t in first)  # only the JSON's first bytes
    assert not allowed[0, stop].any()
    # a terminated / rejected sequence may only emit stop tokens (no all -inf row -> no NaN when sampling)
    proc.rejected[1] = True
    logits = proc(torch.zeros((2, 6), dtype=torch.long), torch.zeros((2, judge._vocab_size)))
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == sorted(stop)


def test_vllm_requests_with_real_processor(judge):
    reqs = build_vllm_requests([JudgeItem("a", "t2i", "a cube", images(1)[0])], load_rubric("t2i"), judge.processor)
    assert reqs[0]["prompt"].count("<|image_pad|>") == 1 and reqs[0]["prompt"].endswith("<|im_start|>assistant\n")


def test_clip_scorer(clip_dir, scorer):
    import open_clip

    model, _ = open_clip.create_model_from_pretrained("local-dir:" + str(clip_dir))
    assert 2_000_000 < sum(p.numel() for p in model.parameters()) < 5_000_000
    imgs = images(6)
    emb = scorer.embed_images(imgs)
    assert emb.shape == (6, scorer.embed_dim) == (6, 64)
    assert (emb.norm(dim=-1) - 1).abs().max() < 1e-5
    txt = scorer.embed_texts(["a cat", "a dog", "a cat"])
    assert txt.shape == (3, 64) and (txt.norm(dim=-1) - 1).abs().max() < 1e-5
    assert (txt[0] - txt[2]).abs().max() < 1e-6
    refs = images(3, size=80)
    scores = scorer.score(imgs[:3], ["a cat", "a dog", "a cat"], [refs, [refs[0]], []])
    assert [len(s.clip_i_per_ref) for s in scores] == [3, 1, 0]
    assert scores[0].clip_i == pytest.approx(sum(scores[0].clip_i_per_ref) / 3)
    assert scores[2].clip_i is None
    assert scores[1].clip_i_per_ref[0] == pytest.approx(scores[0].clip_i_per_ref[0], abs=0.5)  # same ref, finite
    assert scores[0].clip_t == pytest.approx(float(emb[0] @ txt[0]), abs=1e-5)
    # batching does not change embeddings; the open_clip scheme works as a model reference too
    one = ClipScorer("local-dir:" + str(clip_dir), batch_size=1, cpu_threads=1).setup()
    assert type(one._tokenizer).__name__ == "SimpleTokenizer"  # open_clip's bundled BPE, no download
    assert (one.embed_images(imgs[:3]) - emb[:3]).abs().max() < 1e-5


def test_zoo_references_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFMILL_ZOO", str(tmp_path / "zoo"))
    scorer = ClipScorer("zoo:clip", cpu_threads=1).setup()
    assert (tmp_path / "zoo" / "clip" / "open_clip_config.json").is_file()
    assert scorer.embed_texts(["a cat"]).shape == (1, 64)
    assert scorer.scorer_id == ClipScorer("zoo:clip").scorer_id  # ids hash the reference, not the path


def test_labeling_stage_with_tiny_models(judge, scorer):
    imgs = images(3)
    refs = images(2, size=48)
    rows = [
        {"candidate_id": "c0", "prompt_id": "p0", "task": "t2i", "text": "a cube", "key": "k0"},
        {"candidate_id": "c1", "prompt_id": "p0", "task": "t2i", "text": "a cube", "key": "k1"},
        {"candidate_id": "c2", "prompt_id": "p1", "task": "multi_ref", "text": "the cat", "key": "k2",
         "reference_types": ["subject", "style"]},
    ]
    rows.append({"candidate_id": "c3", "prompt_id": "p0", "task": "t2i", "text": "a cube"})  # looked up by id
    drs = {"enabled": True, "k0": 10.0, "k1": 3.0, "tau": 0.65}  # the profile's shape (DyRef's defaults)
    stage = LabelingStage(judge, scorer, lambdas={"multi_ref": 0.5}, drs=drs)
    assert stage.drs == {"k0": 10.0, "k1": 3.0, "tau": 0.65}
    out = stage.process_batch(rows, {"k0": imgs[0], "k1": None, "k2": imgs[2], "c3": OSError("bad shard")},
                              {}, {"p1": refs})
    assert [r["status"] for r in out] == ["ok", "image_error", "ok", "image_error"]
    for r in out:
        assert list(r) == label_columns()
        assert r["judge_id"] == stage.judge_id_for(rows[out.index(r)]["task"])  # set on every row (resume key)
    assert out[3]["error"] == "unreadable image: OSError: bad shard"
    ok, bad, mr, _ = out
    assert set(all_dimensions()) - {"prompt_alignment", "visual_quality", "aesthetics"} == {
        d for d in all_dimensions() if ok[d] is None}
    assert ok["lambda_harmonic"] == pytest.approx(max(ok["clip_t"], 1e-6))  # t2i: λH = CLIP_T
    assert 0.0 <= ok["reward"] <= 1.0 and ok["judge_id"] == judge.judge_id_for("t2i")
    assert bad["reward"] is None and bad["clip_t"] is None and bad["error"] == "missing image"
    assert len(mr["clip_i_per_ref"]) == 2 and mr["reference_fidelity"] is not None and mr["aesthetics"] is None
    from labelers.rewards import aggregate_reward, drs_clip_i, lambda_harmonic

    lam_h = lambda_harmonic(drs_clip_i(mr["clip_i_per_ref"]), mr["clip_t"], 0.5)  # DRS-sharpened CLIP_I
    assert mr["lambda_harmonic"] == pytest.approx(lam_h)
    assert mr["clip_i"] == pytest.approx(sum(mr["clip_i_per_ref"]) / 2)  # stored raw
    scores = {d: mr[d] for d in ("reference_fidelity", "prompt_alignment", "visual_quality")}
    assert mr["reward"] == pytest.approx(aggregate_reward(scores, lam_h, 0.5, 0.5))
    # the rows make a polars table with the declared schema
    import polars as pl

    from labelers.stage import label_schema

    table = pl.DataFrame(out, schema=label_schema())
    assert table.height == 4 and table["clip_i_per_ref"].to_list()[1] == []


def test_prefix_cache_changes_speed_not_answers(judge_dir):
    """The shared rubric prefix computed once (prefix_cache) must give exactly the answers of a full prefill."""
    items = [JudgeItem(key=f"k{i}", task=task, text="a red fox", image=img,
                       source_image=img if task == "edit" else None,
                       reference_images=(img,) if task == "multi_ref" else ())
             for i, (task, img) in enumerate(zip(["t2i", "t2i", "edit", "multi_ref"], images(4)))]
    answers = {}
    for cached in (True, False):
        j = TransformersJudge(str(judge_dir), batch_size=4, max_new_tokens=256, model_ref="zoo:judge",
                              cpu_threads=1, prefix_cache=cached)
        j.setup()
        answers[cached] = [(r.status, r.raw) for r in j.judge(items)]
    assert answers[True] == answers[False]
    assert all(status == "ok" for status, _ in answers[True])
