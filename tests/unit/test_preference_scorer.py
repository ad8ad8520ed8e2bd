"""The optional preference scorer (a PickScore/HPS-style CLIP on the transformers backend) in the labelling stage."""

import pytest
from PIL import Image


@pytest.fixture(scope="module")
def tiny_transformers_clip(tmp_path_factory):
    """A tiny random CLIPModel + CLIPProcessor saved with save_pretrained (the layout of PickScore_v1)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from pipelines.zoo.diffusion import build_clip_tokenizer

    out = tmp_path_factory.mktemp("pickscore")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(out)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=build_clip_tokenizer(out / "tok"))
    processor.save_pretrained(out)
    return str(out)


def test_preference_score_column_comes_from_the_preference_model(tiny_transformers_clip):
    from labelers.clip_scorer import ClipScorer
    from labelers.stage import LabelingStage

    preference = ClipScorer(tiny_transformers_clip, backend="transformers", cpu_threads=1)
    preference.setup()
    clip = ClipScorer("zoo:clip", cpu_threads=1)
    clip.setup()
    stage = LabelingStage(judge=None, scorer=clip, preference_scorer=preference)
    images = {f"c{i}": Image.new("RGB", (64, 64), (40 * i, 90, 200 - 40 * i)) for i in range(3)}
    rows = [{"candidate_id": k, "prompt_id": "p", "task": "t2i", "text": "a blue square"} for k in images]
    labelled = stage.process_batch(rows, images)
    assert all(r["status"] == "ok" and -1.0 <= r["preference_score"] <= 1.0 for r in labelled)
    direct = preference.score(list(images.values()), ["a blue square"] * 3, [[], [], []])
    assert [r["preference_score"] for r in labelled] == pytest.approx([s.clip_t for s in direct])
    without = LabelingStage(judge=None, scorer=clip).process_batch(rows, images)
    assert all(r["preference_score"] is None for r in without)
