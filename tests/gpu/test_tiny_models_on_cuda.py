"""The same tiny zoo through the same code on a CUDA device (skipped without CUDA)."""

import pytest

pytestmark = pytest.mark.gpu


def test_generate_judge_and_score_on_cuda():
    from labelers.clip_scorer import ClipScorer
    from labelers.judge import JudgeItem, TransformersJudge
    from pipelines.generation import GenerationRequest, ImageGenerator

    generator = ImageGenerator("zoo:t2i", device="cuda", steps=4, batch_size=4)
    generator.setup()
    images = generator.generate([GenerationRequest(key=f"k{i}", text="a red fox", seed=i) for i in range(4)])
    assert [im.size for im in images] == [(64, 64)] * 4
    again = generator.generate([GenerationRequest(key="k0", text="a red fox", seed=0)] * 4)
    assert list(again[0].getdata()) == list(images[0].getdata())

    judge = TransformersJudge("zoo:judge", device="cuda", batch_size=4, max_new_tokens=256)
    judge.setup()
    results = judge.judge([JudgeItem(key=f"k{i}", task="t2i", text="a red fox", image=im) for i, im in enumerate(images)])
    assert [r.status for r in results] == ["ok"] * 4
    assert all(0 <= v <= 5 for r in results for v in r.scores.values())

    scorer = ClipScorer("zoo:clip", device="cuda")
    scorer.setup()
    scores = scorer.score(images, ["a red fox"] * 4, [[images[0]]] * 4)
    assert len(scores) == 4 and all(len(s.clip_i_per_ref) == 1 for s in scores)
