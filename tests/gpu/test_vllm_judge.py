"""The vLLM judge on a GPU node (needs CUDA and the `gpu` extra; skipped otherwise)."""

import importlib.util

import pytest
from PIL import Image

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs the gpu extra (vllm)")]


def test_vllm_judge_returns_valid_judgements_for_the_tiny_judge():
    from labelers.judge import JudgeItem, VllmJudge

    judge = VllmJudge("zoo:judge", max_model_len=2048, gpu_memory_utilization=0.3, batch_size=8, max_new_tokens=256)
    judge.setup()
    items = [JudgeItem(key=f"k{i}", task="t2i", text="a red fox", image=Image.new("RGB", (64, 64), (30 * i, 0, 0)))
             for i in range(4)]
    results = judge.judge(items)
    assert [r.status for r in results] == ["ok"] * 4
    assert all(0 <= v <= 5 for r in results for v in r.scores.values())
