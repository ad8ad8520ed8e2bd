import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is ~10x faster than two competing ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The tiny models the trainer tests share, built once per session into private dirs (no downloads); the tests only
# read them (adapters and checkpoints go to each test's own output dir).
@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The zoo's tiny StableDiffusionPipeline."""
    from pipelines.zoo.diffusion import build_t2i

    out = tmp_path_factory.mktemp("zoo") / "t2i"
    build_t2i(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """The zoo's tiny open_clip model (the GRPO reward)."""
    pytest.importorskip("open_clip")
    from pipelines.zoo.clip import build_clip

    out = tmp_path_factory.mktemp("zoo_clip") / "clip"
    build_clip(out)
    return str(out)


@pytest.fixture(scope="session")
def prompt_pool(tmp_path_factory) -> str:
    """An RL prompt pool: t2i and multi_ref prompts (flat-colour reference pictures), train and held-out."""
    import polars as pl
    from PIL import Image

    from tiny_corpus import COLOURS

    root = tmp_path_factory.mktemp("pool")
    refs = []
    for k in range(3):
        path = root / f"ref_{k}.png"
        Image.new("RGB", (64, 64), COLOURS[k]).save(path)
        refs.append(str(path))
    rows = [
        {"prompt_id": "p0", "task": "t2i", "text": "a red square", "reference_images": [], "reference_types": [],
         "split": "train", "difficulty": 0.3},
        {"prompt_id": "p1", "task": "multi_ref", "text": "the subject in this style", "reference_images": refs[:2],
         "reference_types": ["subject", "style"], "split": "train", "difficulty": 0.6},
        {"prompt_id": "p2", "task": "multi_ref", "text": "subject, style and background",
         "reference_images": refs, "reference_types": ["subject", "style", "background"], "split": "train",
         "difficulty": 0.8},
        {"prompt_id": "h0", "task": "t2i", "text": "a blue circle", "reference_images": [], "reference_types": [],
         "split": "heldout", "difficulty": 0.3},
        {"prompt_id": "h1", "task": "multi_ref", "text": "a dog in this style", "reference_images": refs[1:],
         "reference_types": ["subject", "style"], "split": "heldout", "difficulty": 0.5},
    ]
    path = root / "pool.parquet"
    pl.DataFrame(rows, schema_overrides={"reference_images": pl.List(pl.String),
                                         "reference_types": pl.List(pl.String)}).write_parquet(path)
    return str(path)
