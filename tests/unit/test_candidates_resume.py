"""The candidate shard writer resumes after a crash without regenerating or duplicating (generation here is a
plain function so the test isolates the plumbing; tests/unit/test_zoo_generation.py covers diffusers)."""

import pytest
from PIL import Image

from pipelines.candidates import generate_partition, load_candidate_images, plan_candidates, reference_grid
from pipelines.generation import GenerationRequest


def _plan():
    prompts = [{"prompt_id": f"p{i}", "task": "t2i", "text": f"prompt {i}"} for i in range(5)]
    gens = {"t2i": {"generator_id": "g", "params": {"steps": 2}}}
    return prompts, plan_candidates(prompts, gens, seeds_per_prompt=2, base_seed=7)


def _requests(prompts_by_id):
    def make(chunk):
        return {"t2i": [GenerationRequest(key=c["candidate_id"], text=prompts_by_id[c["prompt_id"]]["text"],
                                          seed=c["seed"]) for c in chunk]}
    return make


def test_plan_is_deterministic():
    _, a = _plan()
    _, b = _plan()
    assert [c["candidate_id"] for c in a] == [c["candidate_id"] for c in b]
    assert len({c["candidate_id"] for c in a}) == 10 and {c["seed"] for c in a} == {7, 8}


def test_crash_midway_resumes_without_duplicates(tmp_path):
    prompts, plan = _plan()
    by_id = {p["prompt_id"]: p for p in prompts}
    calls = []

    def generate(task, requests):
        calls.append(len(requests))
        if len(calls) == 3:
            raise RuntimeError("CUDA error: simulated crash")
        return [Image.new("RGB", (8, 8), (r.seed, 0, 0)) for r in requests]

    with pytest.raises(RuntimeError, match="simulated"):
        generate_partition(plan, by_id, _requests(by_id), generate, tmp_path, shard_size=3, log=lambda m: None)
    assert len(list(tmp_path.glob("*.tar"))) == 2  # two whole shards survived the crash

    calls.clear()
    table, generated = generate_partition(plan, by_id, _requests(by_id),
                                          lambda t, rs: [Image.new("RGB", (8, 8)) for _ in rs],
                                          tmp_path, shard_size=3, log=lambda m: None)
    assert generated == 4 and len(table) == 10
    assert table["candidate_id"].to_list() == [c["candidate_id"] for c in plan]
    assert table["candidate_id"].n_unique() == 10
    images = load_candidate_images(tmp_path)
    assert len(images) == 10 and all(isinstance(i, Image.Image) for i in images.values())

    again, generated = generate_partition(plan, by_id, _requests(by_id), None, tmp_path, 3, log=lambda m: None)
    assert generated == 0 and again.equals(table)


def test_corrupt_image_in_shard_reports_where(tmp_path):
    from pipelines.io import write_shard

    write_shard(tmp_path / "000000.tar", [{"__key__": "bad", "png": b"garbage"}])
    images = load_candidate_images(tmp_path)
    assert isinstance(images["bad"], ValueError) and "000000.tar/bad" in str(images["bad"])


def test_reference_grid_tiles_to_size():
    grid = reference_grid([Image.new("RGB", (10, 10), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]], 64, 64)
    assert grid.size == (64, 64) and grid.getpixel((5, 5)) == (255, 0, 0) and grid.getpixel((40, 5)) == (0, 255, 0)
