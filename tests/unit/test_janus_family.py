"""The autoregressive family (Janus through transformers): the tiny zoo checkpoint loads like a real one, samples
as ``generate`` does, records exact token log-probabilities, and generates candidates through ImageGenerator."""

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def janus():
    from trainers.families import load_family

    return load_family("zoo:janus")


def test_detected_from_config_json_and_text_only(janus):
    from trainers.families import UnsupportedTaskError, detect_family, input_images, resolve_path

    path = resolve_path("zoo:janus")
    assert detect_family(path) == "janus" and input_images(path) == 0
    assert janus.pipeline_class == "JanusForConditionalGeneration"
    assert janus.num_image_tokens == 16 and janus.codebook_size == 64
    janus.check_task("t2i")
    with pytest.raises(UnsupportedTaskError, match="edit.*janus"):
        janus.check_task("edit")


def test_greedy_sampling_with_cfg_equals_transformers_generate(janus):
    text = "a red cube on a table"
    ours = janus.sample(janus.encode([text], 3.0), None, 3.0, 1.0, greedy=True)["tokens"]
    inputs = janus.processor(text=[janus.prompt_text(text)], generation_mode="image", return_tensors="pt")
    theirs = janus.model.generate(**inputs, generation_mode="image", do_sample=False, guidance_scale=3.0)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sampled_log_probs_equal_teacher_forced_and_batch_invariant(janus, guidance):
    import torch

    texts = ["a red cube", "two blue spheres on a wooden table", "x"]
    prompts = janus.encode(texts, guidance)
    out = janus.sample(prompts, [torch.Generator().manual_seed(s) for s in (1, 2, 3)], guidance, 1.0)
    logits = janus.token_logits(prompts, out["tokens"], guidance, 1.0)
    recomputed = torch.log_softmax(logits, -1).gather(-1, out["tokens"][..., None])[..., 0]
    assert (recomputed - out["log_probs"]).abs().max() < 1e-5
    assert float(out["entropy"].min()) > 0
    alone = janus.sample(janus.encode(texts[1:2], guidance), [torch.Generator().manual_seed(2)], guidance, 1.0)
    assert alone["tokens"][0].tolist() == out["tokens"][1].tolist()


def test_image_generator_generates_janus_candidates_seeded_and_batched():
    from pipelines.generation import GenerationRequest, ImageGenerator

    reqs = [GenerationRequest(key=f"k{i}", text=t, seed=s)
            for i, (t, s) in enumerate([("a red cube", 0), ("a red cube", 1), ("a blue ring", 0)])]
    gen = ImageGenerator("zoo:janus", guidance_scale=3.0, batch_size=2, cpu_threads=1)
    images = gen.generate(reqs)
    assert [im.size for im in images] == [(64, 64)] * 3
    arrays = [np.asarray(im) for im in images]
    assert not np.array_equal(arrays[0], arrays[1])  # another seed, another image
    one_by_one = ImageGenerator("zoo:janus", guidance_scale=3.0, batch_size=1, cpu_threads=1).generate(reqs[2:])
    # the same tokens whatever the batch (the VQ decoder's float kernels may differ in the last bit per batch shape)
    assert np.abs(np.asarray(one_by_one[0]).astype(int) - arrays[2]).max() <= 1
    no_cfg = ImageGenerator("zoo:janus", guidance_scale=1.0, batch_size=2, cpu_threads=1)
    assert no_cfg.generator_id != gen.generator_id
    assert not np.array_equal(np.asarray(no_cfg.generate(reqs[:1])[0]), arrays[0])
    with pytest.raises(ValueError, match="text only"):
        ImageGenerator("zoo:janus", kind="edit").setup()


def test_a_size_the_model_cannot_draw_is_resized_and_said_once(caplog):
    from pipelines.generation import GenerationRequest, ImageGenerator

    reqs = [GenerationRequest(key=f"k{i}", text="a red cube", seed=i) for i in range(3)]
    gen = ImageGenerator("zoo:janus", guidance_scale=1.0, batch_size=2, cpu_threads=1, width=48, height=48)
    with caplog.at_level("WARNING", logger="pipelines.generation"):
        images = gen.generate(reqs)  # two batches
    assert [im.size for im in images] == [(48, 48)] * 3
    said = [r.getMessage() for r in caplog.records if "resized to the requested" in r.getMessage()]
    assert said == ["zoo:janus draws 64x64 images; resized to the requested 48x48 (set the generator's width and "
                    "height to the model's size to avoid it)"]
