"""A whole corpus version loads with ``datasets.load_dataset(<version dir>)`` in one call (issue 14, deliverable 5).

Small SFT and preference corpora mixing t2i, edit and multi_ref rows — null scores in one task or partition, floats
in another; empty and null lists — are built through the real sources (``SftSource``, ``PreferenceSource``) and
writer (``build_corpus``), twice (the second version references the first one's shards through ``../``). Each
version directory then loads in one call with every row, the expected columns and values, decoded images, and
the features its ``README.md`` declares.
"""

from __future__ import annotations

import io
import json
from collections import Counter

import polars as pl
import pytest
import yaml

datasets = pytest.importorskip("datasets")

from pipelines.corpora import ShardLimits, build_corpus, verify_corpus  # noqa: E402
from pipelines.dataset_card import JsonTypeConflict, card_text, json_type, merge_types, write_dataset_card  # noqa: E402

SRC_COLOUR, REF_COLOURS = (10, 200, 10), [(200, 10, 200), (10, 10, 200)]


def _png(colour, size=32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _colour(cid: str) -> tuple[int, int, int]:
    n = int(cid[1:])
    return (40 + 13 * n % 200, 250 - 11 * n % 200, 7 * n % 250)


def _close(image, colour, tol=12) -> bool:
    pixel = image.convert("RGB").getpixel((16, 16))
    return all(abs(a - b) <= tol for a, b in zip(pixel, colour))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two partitions of candidates with their images, labels and pairs, and the prompts they answer.

    p1: t2i only — its label table has ``instruction_following``, ``clip_i`` and ``preference_score`` all null
    (polars dtype Null) and its pair table ``p_chosen`` all null and an integer ``label``; p2: t2i, edit and
    multi_ref — floats there (``preference_score`` stays null everywhere: the card declares it float from the
    schema)."""
    import webdataset as wds

    from pipelines.paths import Layout

    tmp = tmp_path_factory.mktemp("world")
    layout = Layout(tmp / "data")
    (tmp / "img").mkdir()
    (tmp / "img" / "src.png").write_bytes(_png(SRC_COLOUR))
    for k, colour in enumerate(REF_COLOURS):
        (tmp / "img" / f"ref{k}.png").write_bytes(_png(colour))
    prompts = {
        "qa": {"task": "t2i", "text": "a red fox", "split": "train", "source_image": None, "reference_images": [],
               "reference_types": []},
        "qb": {"task": "t2i", "text": "a blue bird", "split": "train", "source_image": None,
               "reference_images": [], "reference_types": None},
        "qh": {"task": "t2i", "text": "held out", "split": "heldout", "source_image": None, "reference_images": [],
               "reference_types": []},
        "qe": {"task": "edit", "text": "make it green", "split": "train",
               "source_image": str(tmp / "img" / "src.png"), "reference_images": [], "reference_types": []},
        "qm": {"task": "multi_ref", "text": "these two together", "split": "train", "source_image": None,
               "reference_images": [str(tmp / "img" / f"ref{k}.png") for k in range(2)],
               "reference_types": ["subject", "style"]},
    }
    parts = {"p1": {"c0": "qa", "c1": "qa", "c2": "qb", "c3": "qb", "c4": "qh", "c5": "qa"},
             "p2": {"c10": "qa", "c11": "qa", "c12": "qe", "c13": "qe", "c14": "qm", "c15": "qm", "c16": "qm"}}
    for part, cands in parts.items():
        shards = layout.asset_dir("candidate_images", part) / "shards"
        shards.mkdir(parents=True)
        with wds.TarWriter(str(shards / "000000.tar")) as sink:
            for cid in cands:
                sink.write({"__key__": cid, "png": _png(_colour(cid))})
        pl.DataFrame({"candidate_id": list(cands), "prompt_id": list(cands.values()),
                      "generator_id": [f"gen-{cid}" for cid in cands],
                      "image_sha256": [f"sha-{cid}" for cid in cands]}).write_parquet(layout.candidates(part))
    layout.labels("p1").parent.mkdir(parents=True)
    p1 = list(parts["p1"])
    pl.DataFrame({  # built from Python rows: the all-null columns get polars' Null dtype, as a t2i-only batch does
        "candidate_id": p1, "prompt_id": [parts["p1"][c] for c in p1], "judge_id": ["j"] * 6,
        "prompt_alignment": [4.0, 3.0, 5.0, 2.0, 4.0, 1.0],
        "prompt_alignment_feedback": ["ok", "meh", "great", "poor", "fine", "bad"],
        "instruction_following": [None] * 6, "instruction_following_feedback": [None] * 6,
        "clip_t": [0.3, 0.2, 0.35, 0.1, 0.3, 0.05], "clip_i": [None] * 6,
        "clip_i_per_ref": [[], [], None, [], [], []],  # a null list: written as []
        "preference_score": [None] * 6,
        "reward": [0.8, 0.6, 0.9, 0.4, 0.7, None], "status": ["ok"] * 4 + ["ok", "parse_error"],
        "error": [None] * 5 + ["bad json"],
    }).write_parquet(layout.labels("p1"))
    layout.labels("p2").parent.mkdir(parents=True)
    p2 = list(parts["p2"])
    pl.DataFrame({
        "candidate_id": p2, "prompt_id": [parts["p2"][c] for c in p2], "judge_id": ["j"] * 7,
        "prompt_alignment": [3.0, 4.0, 4.0, 5.0, 2.0, 3.0, 4.0],
        "prompt_alignment_feedback": ["a", "b", "c", "d", "e", "f", "g"],
        "instruction_following": [None, None, 4.0, 2.0, None, None, None],
        "instruction_following_feedback": [None, None, "kept the dog", "lost the dog", None, None, None],
        "clip_t": [0.3, 0.31, 0.2, 0.22, 0.25, 0.26, 0.27], "clip_i": [None, None, 0.9, 0.8, 0.7, 0.75, 0.72],
        "clip_i_per_ref": [[], [], [0.9], [0.8], [0.6, 0.8], [0.7, 0.8], [0.7, 0.74]],
        "preference_score": pl.Series([None] * 7, dtype=pl.Float64),
        "reward": [0.5, 0.55, 0.8, 0.6, 0.65, 0.7, 0.75], "status": ["ok"] * 7, "error": pl.Series([None] * 7,
                                                                                                 dtype=pl.String),
    }).write_parquet(layout.labels("p2"))
    for part, rows in {
        "p1": {"pair_id": ["r0", "r1"], "prompt_id": ["qa", "qb"], "chosen_id": ["c0", "c2"],
               "rejected_id": ["c1", "c3"], "p_chosen": [None, None], "margin": [0.2, 0.5],
               "strategy": ["best_vs_worst"] * 2, "label": [1, 1]},
        "p2": {"pair_id": ["r10", "r11", "r12", "r13"], "prompt_id": ["qa", "qe", "qm", "qm"],
               "chosen_id": ["c11", "c12", "c16", "c15"], "rejected_id": ["c10", "c13", "c14", "c16"],
               "p_chosen": [0.6, 0.9, 0.7, 0.5], "margin": [0.05, 0.2, 0.1, 0.0],
               "strategy": ["best_vs_worst"] * 4, "label": [1.0, 1.0, 1.0, 0.5]},
    }.items():
        layout.pairs(part).parent.mkdir(parents=True)
        pl.DataFrame(rows).write_parquet(layout.pairs(part))
    return tmp, layout, prompts


def _build(world, corpus: str, partitions: list[str]):
    from pipelines.corpus_sources import CorpusFilters, PreferenceSource, SftSource

    tmp, layout, prompts = world
    filters = CorpusFilters({})
    if corpus == "sft_corpus":
        source = SftSource(layout, prompts, {"corpora": {"sft_min_reward_quantile": 0.0}}, filters)
    else:
        source = PreferenceSource(layout, prompts, seed=0, filters=filters)
    return build_corpus(tmp / "corpora" / corpus, corpus, {p: f"fp-{p}" for p in partitions},
                        {"corpora": {"seed": 0}}, source, ShardLimits(max_samples=2))


def _load(version_url: str, cache):
    return datasets.load_dataset(version_url, split="train", cache_dir=str(cache))


def _card(version_dir):
    text = (version_dir / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


def _check_card(version_dir, ds, manifest):
    meta, text = _card(version_dir)
    declared = datasets.Features._from_yaml_list(meta["dataset_info"]["features"])
    assert declared == ds.features
    assert meta["configs"][0]["data_files"][0]["path"] == [s["path"] for s in manifest["shards"]]
    assert meta["dataset_info"]["splits"] == [{"name": "train", "num_bytes": manifest["num_bytes"],
                                               "num_examples": manifest["num_samples"]}]
    assert f"version `{manifest['version']}`" in text and "## Drops" in text
    for reason, n in manifest["drops"].items():
        assert f"| {reason} | {n} |" in text
    assert text == card_text(manifest)  # written from the committed manifest


def test_sft_corpus_loads_in_one_call(world, tmp_path):
    tmp = world[0]
    first = _build(world, "sft_corpus", ["p1"])
    build = _build(world, "sft_corpus", ["p1", "p2"])
    assert build.reused == ["p1"] and build.written == ["p2"]
    assert any(s["path"].startswith("../") for s in build.manifest["shards"])
    version_dir = tmp / "corpora" / "sft_corpus" / build.version
    assert verify_corpus(version_dir) == []
    manifest = build.manifest
    assert manifest["drops"] == {"heldout_prompt": 1, "label_parse_error": 1}
    assert sorted(manifest["layouts"]) == ["edit:jpg,json,src.jpg,txt", "multi_ref:jpg,json,ref_0.jpg,ref_1.jpg,txt",
                                           "t2i:jpg,json,txt"]

    ds = _load(str(version_dir), tmp_path / "cache")
    assert len(ds) == manifest["num_samples"] == 4 + 7
    assert set(ds.column_names) == {"__key__", "__url__", "jpg", "txt", "json", "src.jpg", "ref_0.jpg",
                                    "ref_1.jpg"}
    features = ds.features
    assert isinstance(features["jpg"], datasets.Image) and isinstance(features["src.jpg"], datasets.Image)
    meta_features = features["json"]
    assert meta_features["instruction_following"] == datasets.Value("float64")
    assert meta_features["clip_i"] == datasets.Value("float64")
    assert meta_features["preference_score"] == datasets.Value("float64")  # null in every row: from the schema
    assert meta_features["clip_i_per_ref"] == datasets.List(datasets.Value("float64"))
    assert meta_features["error"] == datasets.Value("string")
    assert meta_features["sft_min_reward"] == datasets.Value("float64")

    labels = pl.concat([pl.read_parquet(world[1].labels(p)) for p in ("p1", "p2")], how="diagonal_relaxed")
    by_id = {row["candidate_id"]: row for row in labels.iter_rows(named=True)}
    tasks = Counter()
    for row in ds:
        cid, meta = row["__key__"], row["json"]
        task = meta["task"]
        tasks[task] += 1
        assert meta["candidate_id"] == cid and row["txt"] == world[2][meta["prompt_id"]]["text"]
        assert meta["reward"] == pytest.approx(by_id[cid]["reward"])
        assert meta["prompt_alignment"] == by_id[cid]["prompt_alignment"]
        assert _close(row["jpg"], _colour(cid))
        assert meta["preference_score"] is None
        if task == "t2i":
            assert row["src.jpg"] is None and row["ref_0.jpg"] is None and row["ref_1.jpg"] is None
            assert meta["instruction_following"] is None and meta["clip_i"] is None
            assert meta["clip_i_per_ref"] == []
        elif task == "edit":
            assert _close(row["src.jpg"], SRC_COLOUR) and row["ref_0.jpg"] is None
            assert meta["instruction_following"] == by_id[cid]["instruction_following"]
            assert meta["clip_i_per_ref"] == pytest.approx(by_id[cid]["clip_i_per_ref"])
        else:
            assert row["src.jpg"] is None
            assert _close(row["ref_0.jpg"], REF_COLOURS[0]) and _close(row["ref_1.jpg"], REF_COLOURS[1])
            assert len(meta["clip_i_per_ref"]) == 2
    assert tasks == {"t2i": 6, "edit": 2, "multi_ref": 3}
    assert sorted(ds["__key__"]) == sorted(pl.read_parquet(version_dir / "index.parquet")["key"].to_list())
    _check_card(version_dir, ds, manifest)

    # the first version (t2i only, all nulls) loads on its own, with its own card
    first_dir = tmp / "corpora" / "sft_corpus" / first.version
    alone = _load(str(first_dir), tmp_path / "cache1")
    assert len(alone) == 4 and "src.jpg" not in alone.column_names
    assert alone.features["json"]["instruction_following"] == datasets.Value("string")  # Null dtype: unknown
    assert alone.features["json"]["preference_score"] == datasets.Value("string")
    _check_card(first_dir, alone, first.manifest)

    # the trainers' readers read what the writer wrote
    from trainers.data import sft_samples

    metas = [meta for _, _, meta in sft_samples(version_dir)]
    assert sorted(m["__key__"] for m in metas) == sorted(ds["__key__"])
    assert all(isinstance(m["clip_i_per_ref"], list) for m in metas)
    assert sum(1 for m in metas if m["_src"] is not None) == 2 and sum(len(m["_refs"]) == 2 for m in metas) == 3


def test_preference_corpus_loads_in_one_call(world, tmp_path):
    tmp = world[0]
    _build(world, "preference_corpus", ["p1"])
    build = _build(world, "preference_corpus", ["p1", "p2"])
    assert build.reused == ["p1"]
    version_dir = tmp / "corpora" / "preference_corpus" / build.version
    manifest = build.manifest
    assert verify_corpus(version_dir) == []

    # what the issue reports: the shards' own samples disagree, and datasets' inference cannot load them together
    shards = [str((version_dir / s["path"]).resolve()) for s in manifest["shards"]]
    with pytest.raises(datasets.exceptions.DatasetGenerationError):  # "Couldn't cast array of type double to null"
        datasets.load_dataset("webdataset", data_files={"train": shards}, split="train",
                              cache_dir=str(tmp_path / "inferred"))

    ds = _load(str(version_dir), tmp_path / "cache")
    assert len(ds) == manifest["num_samples"] == 6
    assert set(ds.column_names) == {"__key__", "__url__", "jpg_0.jpg", "jpg_1.jpg", "caption.txt", "label_0.txt",
                                    "label_1.txt", "json", "src.jpg", "ref_0.jpg", "ref_1.jpg"}
    meta_features = ds.features["json"]
    assert meta_features["p_chosen"] == datasets.Value("float64")
    assert meta_features["label"] == datasets.Value("float64")  # an integer column in p1, floats in p2
    assert meta_features["chosen_is_jpg_0"] == datasets.Value("bool")
    assert meta_features["reference_types"] == datasets.List(datasets.Value("string"))
    pairs = pl.concat([pl.read_parquet(world[1].pairs(p)) for p in ("p1", "p2")], how="diagonal_relaxed")
    by_id = {row["pair_id"]: row for row in pairs.iter_rows(named=True)}
    prompts = world[2]
    for row in ds:
        meta = row["json"]
        pair = by_id[row["__key__"]]
        task = prompts[pair["prompt_id"]]["task"]
        assert meta["task"] == task and row["caption.txt"] == prompts[pair["prompt_id"]]["text"]
        assert meta["p_chosen"] == (None if pair["p_chosen"] is None else pytest.approx(pair["p_chosen"]))
        assert meta["label"] == float(pair["label"]) and isinstance(meta["label"], float)
        assert meta["reference_types"] == list(prompts[pair["prompt_id"]]["reference_types"] or [])
        first, second = (pair["chosen_id"], pair["rejected_id"]) if meta["chosen_is_jpg_0"] else (
            pair["rejected_id"], pair["chosen_id"])
        assert _close(row["jpg_0.jpg"], _colour(first)) and _close(row["jpg_1.jpg"], _colour(second))
        assert meta["chosen_generator_id"] == f"gen-{pair['chosen_id']}"
        label_0 = float(pair["label"]) if meta["chosen_is_jpg_0"] else 1.0 - float(pair["label"])
        assert float(row["label_0.txt"]) == label_0 and float(row["label_1.txt"]) == 1.0 - label_0
        assert (row["src.jpg"] is not None) == (task == "edit")
        assert (row["ref_1.jpg"] is not None) == (task == "multi_ref")
        if task == "edit":
            assert _close(row["src.jpg"], SRC_COLOUR)
    _check_card(version_dir, ds, manifest)

    from trainers.data import preference_samples

    assert len(list(preference_samples(version_dir))) == 6


def test_card_for_a_version_written_without_one(world, tmp_path):
    """A version committed by the writer before cards (no README.md, no json_types): write_dataset_card reads
    the JSON types from its shards, and the version loads."""
    import shutil

    build = _build(world, "preference_corpus", ["p1", "p2"])
    root = world[0] / "corpora" / "preference_corpus"
    old = tmp_path / "preference_corpus"
    shutil.copytree(root, old)
    version_dir = old / build.version
    (version_dir / "README.md").unlink()
    manifest = json.loads((version_dir / "manifest.json").read_text())
    manifest.pop("json_types")
    (version_dir / "manifest.json").write_text(json.dumps(manifest))
    assert write_dataset_card(str(version_dir)) and not write_dataset_card(str(version_dir))
    ds = _load(str(version_dir), tmp_path / "cache")
    assert len(ds) == 6 and ds.features["json"]["label"] == datasets.Value("float64")

    # the card's sample count is checked on loading
    card = (version_dir / "README.md").read_text()
    (version_dir / "README.md").write_text(card.replace("num_examples: 6", "num_examples: 7"))
    with pytest.raises(datasets.exceptions.NonMatchingSplitsSizesError):
        _load(str(version_dir), tmp_path / "cache2")


def test_json_types_merge_and_conflicts():
    assert merge_types(json_type(None), json_type(1.5)) == "float64"
    assert merge_types(json_type(1), json_type(1.5)) == "float64"
    assert merge_types(json_type([]), json_type(["a"])) == {"list": "string"}
    assert merge_types(json_type({"a": None}), json_type({"b": True})) == {"struct": {"a": "null", "b": "bool"}}
    with pytest.raises(JsonTypeConflict, match=r"\.score is string in one sample and float64"):
        merge_types(json_type({"score": "high"}), json_type({"score": 0.5}), "json")
    with pytest.raises(JsonTypeConflict):
        merge_types(json_type(True), json_type(1))


def test_a_sample_with_a_conflicting_json_field_fails_the_build(tmp_path):
    class Source:
        def samples(self, partition, drops):
            for i, score in enumerate([0.5, "high"]):
                yield {"__key__": f"k{i}", "txt": "x", "json": json.dumps({"score": score}).encode()}, {"task": "t2i"}

        def reused(self, partition, rows):
            pass

    with pytest.raises(JsonTypeConflict, match="partition p, sample k1: json.score"):
        build_corpus(tmp_path, "c", {"p": "1"}, {}, Source(), ShardLimits(max_samples=10))
    assert not any(tmp_path.glob("*/manifest.json"))
