"""The world judge's training data and its agreement measure (pipelines/proving_judge.py), without a model; and a
minimal training run's evaluations."""

import json

from labelers.judge import JudgeItem
from labelers.judge.protocol import STATUS_OK, JudgeResult
from labelers.verifier import verify
from pipelines.proving_judge import agreement, caption_examples, describe
from pipelines.proving_world import Obj, Scene, render


def test_a_description_states_every_fact_of_the_scene_in_the_verifiers_grammar():
    scene = Scene(objects=(Obj("red", "circle", "large", (0, 0)),), background="grey")
    text = describe(scene)
    assert text == "a large red circle in the top left on a grey background"
    v = verify(JudgeItem(key="k", task="t2i", text=text, image=render(scene, 48)))
    assert v.all_passed and len(v.facts) >= 5  # count, colour+shape, size, cell, background all checked


def test_caption_targets_are_true_of_their_images_and_cover_broken_scenes():
    examples = caption_examples(seed=7, start=0, n=40)
    assert len({answer for _, answer in examples}) > 30
    assert any(answer.startswith("nothing") for _, answer in examples)  # the "missing object" break
    for item, answer in examples:
        if answer.startswith("nothing") or " and " in answer:
            continue  # outside the t2i grammar (no object / two objects): nothing to check against
        assert verify(JudgeItem(key=item.key, task="t2i", text=answer, image=item.image)).all_passed, answer


def _answer(**scores):
    return json.dumps({dim: {"score": s, "feedback": "x"} for dim, s in scores.items()})


def _result(key, **scores):
    return JudgeResult(key=key, status=STATUS_OK, scores={k: float(v) for k, v in scores.items()})


def test_agreement_counts_orders_and_ties_of_same_prompt_pairs_only():
    item = lambda key: JudgeItem(key=key, task="t2i", text="a red circle", image=None)  # noqa: E731
    pairs = [(item("p"), _answer(a=5, b=5)), (item("p"), _answer(a=3, b=3)), (item("p"), _answer(a=1, b=1)),
             (item("q"), _answer(a=5, b=5))]
    # prompt p: the judge orders (5 vs 3) right, ties (3 vs 1), orders (5 vs 1) right; q has no partner
    results = [_result("p", a=5, b=5), _result("p", a=2, b=2), _result("p", a=2, b=2), _result("q", a=4, b=4)]
    out = agreement(pairs, results)
    assert out["pairwise_n"] == 3 and out["pairwise_ties"] == 1 / 3 and out["pairwise"] == 1.0
    assert out["exact"] == 2 / 8 and out["within_1"] == 1.0  # p0 exact; every other score off by one
    assert out["correct_accuracy"] == 3 / 4  # all fives exactly when the verifier's are: p0, p1, p2 yes; q no

    always_five = [_result(r.key, a=5, b=5) for r in results]
    blind = agreement(pairs, always_five)
    assert blind["pairwise"] is None and blind["pairwise_ties"] == 1.0  # the first world judge's reading


def test_training_evaluates_renders_and_candidates_with_one_loaded_judge(tmp_path, monkeypatch, one_torch_thread):
    """A minimal world-judge run (zoo:judge, 1 caption + 1 judging step) writes both agreements, judged by one
    judge setup (it used to load the trained judge once per evaluation)."""
    from labelers.judge import TransformersJudge
    from pipelines.proving_judge import train_world_judge

    setups = []
    real_setup = TransformersJudge.setup

    def counting_setup(self):
        setups.append(self.model_path)
        return real_setup(self)

    monkeypatch.setattr(TransformersJudge, "setup", counting_setup)
    info = train_world_judge(tmp_path / "judge", steps=1, caption_steps=1, batch=4, eval_n=2, candidate_prompts=2,
                             candidate_seeds=1, eval_prompts=1, log=lambda m: None)
    assert setups == [str(tmp_path / "judge")]
    assert info["eval"]["n"] == 2 and info["eval_candidates"]["n"] == 4  # 1 held-out prompt x 4 seeds
    assert (tmp_path / "judge" / "train_info.json").is_file()
