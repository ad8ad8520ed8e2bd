"""The transformers judge's speed-ups (labelers/judge/speedups.py) are active on the zoo judge and change nothing
that is generated: greedy answers and seeded retry samples are identical with each one switched off.

Their worth, measured with /work/notes/bench_judge_speedups.py (zoo judge, CPU, one torch thread, 32 t2i items in
batches of 16, greedy, best of 3, two runs on a shared 2-core machine): all on 0.97 / 1.24 s; without the prefix
cache 1.71 / 1.92 s (x1.76 / x1.54); without the preallocated cache layers 1.16 / 1.63 s (x1.19 / x1.31); without
the GQA attention override 1.34 / 1.81 s (x1.38 / x1.46); all off 2.01 / 2.77 s (x2.07 / x2.23).
"""

import pytest
from PIL import Image

from labelers.judge import JudgeItem, TransformersJudge, build_messages, judgement_schema
from labelers.judge import speedups
from labelers.rubrics import load_rubric

OFF = {
    "no_prefix_cache": {"prefix_cache": False},
    "no_preallocated_cache": {"preallocated_cache": False},
    "no_gqa_attention": {"gqa_attention": False},
}


def images(n, size=64):
    return [Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (53 * i + 40) % 256)) for i in range(n)]


def items():
    """Two chunks of t2i (batch 4), then edit and multi_ref: several generate calls, a prefix reused, the
    Qwen-VL rope state carried from one call to the next."""
    imgs = images(7)
    out = [JudgeItem(f"t{i}", "t2i", f"a red fox, take {i}", imgs[i]) for i in range(5)]
    out.append(JudgeItem("e", "edit", "make it blue", imgs[5], source_image=imgs[0]))
    out.append(JudgeItem("m", "multi_ref", "the subject in snow", imgs[6], reference_images=imgs[1:3],
                         reference_types=["subject", "style"]))
    return out


def make_judge(**kw):
    return TransformersJudge("zoo:judge", batch_size=4, max_new_tokens=200, cpu_threads=1, **kw).setup()


def run(judge):
    """Greedy answers of :func:`items`, then one seeded retry sample (attempt 1) of two t2i chats."""
    greedy = [(r.status, r.raw) for r in judge.judge(items())]
    rubric = load_rubric("t2i")
    chats = [build_messages(it, rubric) for it in items()[:2]]
    sampled = judge.generate_structured(chats, judgement_schema(rubric), attempt=1, seed=3)
    return greedy, sampled


@pytest.fixture(scope="module")
def all_on():
    before = speedups.STATS["gqa_fast"]
    judge = make_judge()
    answers = run(judge)
    return judge, answers, speedups.STATS["gqa_fast"] - before


def test_speedups_are_active_on_the_zoo_judge(all_on):
    judge, (greedy, _), gqa_fast_calls = all_on
    assert all(status == "ok" for status, _ in greedy), greedy
    assert judge.prefix_cache_active and judge.cpu_gqa_attention
    stats = judge.stats
    # prefix cache: every generate call started from a cached prefix; the second t2i chunk and the retry reused one
    assert stats["prefix_used"] == 5 and stats["prefix_hit"] >= 2 and stats["prefix_prefill"] >= 1
    # preallocated layers: each decoding step wrote in place (2 layers x steps), the buffers never had to grow
    assert stats["preallocated_in_place"] > 2 * 5 and stats["preallocated_regrow"] == 0
    # the GQA attention override ran its fast path
    assert gqa_fast_calls > 0
    text_config = judge.model.config.get_text_config(decoder=True)
    assert text_config._attn_implementation == speedups.GQA_ATTENTION


@pytest.mark.parametrize("variant", sorted(OFF))
def test_each_speedup_changes_nothing_generated(all_on, variant):
    _, answers_on, _ = all_on
    before = speedups.STATS["gqa_fast"]
    judge = make_judge(**OFF[variant])
    assert run(judge) == answers_on
    off = OFF[variant]
    assert judge.prefix_cache_active == off.get("prefix_cache", True)
    assert judge.cpu_gqa_attention == off.get("gqa_attention", True)
    assert (speedups.STATS["gqa_fast"] > before) == off.get("gqa_attention", True)
    if not off.get("prefix_cache", True):
        assert not judge.stats
    elif not off.get("preallocated_cache", True):
        assert judge.stats["prefix_used"] == 5 and judge.stats["preallocated_in_place"] == 0


def test_shared_prefix_stops_before_images_and_respects_padding():
    import torch

    ids = torch.tensor([[0, 0, 5, 6, 7, 9, 3], [5, 6, 7, 8, 9, 9, 4]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    assert speedups.shared_prefix(ids, mask, []) == (3, [2, 0])
    assert speedups.shared_prefix(ids, mask, [6]) == (1, [2, 0])  # an image/stop token ends the prefix
    holey = torch.tensor([[1, 0, 1, 1, 1, 1, 1], [1] * 7])
    assert speedups.shared_prefix(ids, holey, []) is None  # not cleanly left-padded
