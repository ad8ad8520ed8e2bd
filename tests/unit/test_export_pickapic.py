"""The Pick-a-Pic export (``pipelines.export.export_pickapic`` and ``python -m pipelines.cli export-pickapic``).

Checks: the export loads with ``datasets`` with Pick-a-Pic v2's column names and dtypes, the JPEG bytes decode to
the corpus' images, labels sum to one and are only 0, 0.5, 1 (soft labels rounded with a count, or refused), ties
can be dropped, only t2i pairs by default (others counted as left out, or selected with ``tasks``), the ids and
generator ids (``model_0``/``model_1``) line up with the corpus, a Diffusion-DPO style filter/transform runs on
it, it is deterministic and replaced atomically, and the CLI prints its summary.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

wds = pytest.importorskip("webdataset")
datasets = pytest.importorskip("datasets")

from pipelines.export import MARKER, PICKAPIC_COLUMNS, export_pickapic  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
N = 26  # pairs in the corpus: i % 3 == 2 are ties; the last two (one prompt) are image edits
N_T2I = 24  # what the default export (t2i only) holds
TIES_T2I = sum(1 for i in range(N_T2I) if i % 3 == 2)


def _jpeg(colour, size: int = 16) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def gen(i: int, won: bool) -> str:
    return f"zoo-{'winner' if won else 'loser'}-{i % 4}"


def pair(i: int, label_0: str | None = None, task: str | None = None, generators: bool = True) -> tuple[dict, dict]:
    """A Pick-a-Pic layout sample as the writer makes it (``jpg_0`` is the chosen image when
    ``chosen_is_jpg_0``; the JSON names the candidates' generators unless not ``generators``, as a corpus built
    before they were recorded), and its index row; two pairs per prompt."""
    label_0 = label_0 if label_0 is not None else ["1", "0", "0.5"][i % 3]
    task = task or ("edit" if i >= 24 else "t2i")
    chosen_first = float(label_0) >= 0.5
    meta = {"pair_id": f"pair{i:03d}", "prompt_id": f"q{i // 2}", "chosen_id": f"cand{i}w",
            "rejected_id": f"cand{i}l", "chosen_is_jpg_0": chosen_first, "task": task,
            "label": max(float(label_0), 1 - float(label_0))}
    if generators:
        meta.update(chosen_generator_id=gen(i, True), rejected_generator_id=gen(i, False))
    sample = {"__key__": meta["pair_id"], "jpg_0.jpg": _jpeg((10 * (i % 25), 20, 200)),
              "jpg_1.jpg": _jpeg((200, 10 * (i % 25), 20)), "caption.txt": f"prompt {i // 2}",
              "label_0.txt": label_0, "label_1.txt": f"{1 - float(label_0):.6g}",
              "json": json.dumps(meta).encode()}
    row = {"pair_id": meta["pair_id"], "prompt_id": meta["prompt_id"], "task": task, "label_0": float(label_0),
           "caption": f"prompt {i // 2}"}
    return sample, row


def write_version(corpus_root: Path, version: str, chunks: list[list[tuple[dict, dict]]],
                  reuse_from: str | None = None) -> Path:
    """A version dir in the writer's format; ``reuse_from`` references all of that version's shards as
    ``../<old>/shards/...`` before the new ones."""
    import polars as pl

    vdir = corpus_root / version
    (vdir / "shards").mkdir(parents=True)
    shards, rows = [], []
    if reuse_from:
        old = json.loads((corpus_root / reuse_from / "manifest.json").read_text())
        old_index = pl.read_parquet(corpus_root / reuse_from / "index.parquet")
        for entry in old["shards"]:
            ref = f"../{reuse_from}/{entry['path']}"
            shards.append({**entry, "path": ref})
            rows += [{**r, "shard": ref} for r in old_index.filter(pl.col("shard") == entry["path"]).to_dicts()]
    for n, chunk in enumerate(chunks):
        name = f"{n:06d}.tar"
        with wds.TarWriter(str(vdir / "shards" / name)) as sink:
            for sample, _ in chunk:
                sink.write(sample)
        shards.append({"path": f"shards/{name}", "shard": name, "sha256": "-", "count": len(chunk),
                       "bytes": (vdir / "shards" / name).stat().st_size,
                       "layout": "t2i:caption.txt,jpg_0.jpg,jpg_1.jpg,json,label_0.txt,label_1.txt",
                       "partition": f"batch_{version}"})
        rows += [{**row, "shard": f"shards/{name}", "key": sample["__key__"]} for sample, row in chunk]
    manifest = {"schema_version": 2, "corpus": "preference_corpus", "version": version, "num_samples": len(rows),
                "shards": shards, "layouts": {}, "drops": {}, "inputs": [], "config": {}}
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    pl.DataFrame(rows).write_parquet(vdir / "index.parquet")
    (corpus_root / "latest").write_text(version + "\n")
    return vdir


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory) -> Path:
    """``v1``: pairs 0-13 in 3 shards; ``v2`` (latest): v1's shards by reference + pairs 14-25 in 3 shards."""
    root = tmp_path_factory.mktemp("data") / "corpora" / "preference_corpus"
    write_version(root, "v1", [[pair(i) for i in range(k, min(k + 5, 14))] for k in range(0, 14, 5)])
    write_version(root, "v2", [[pair(i) for i in range(k, min(k + 4, N))] for k in range(14, N, 4)],
                  reuse_from="v1")
    return root


def load(out: Path, tmp_path: Path):
    return datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf_cache"))["train"]


def test_export_loads_with_pickapic_columns(corpus_root, tmp_path):
    out = tmp_path / "pickapic"
    summary = export_pickapic(corpus_root, out, rows_per_file=10)
    assert summary["rows"] == N_T2I and summary["files"] == 3 and summary["ties"] == TIES_T2I
    assert summary["dropped_ties"] == 0 and summary["version"] == "v2"
    # by default only text-to-image pairs: the edit pairs are left out, and said to be
    assert summary["tasks"] == ["t2i"] and summary["left_out"] == {"task_not_t2i:edit": 2}
    assert summary["rows_by_task"] == {"t2i": N_T2I} and summary["notes"] == []
    assert summary["soft_labels"] == "round" and summary["soft_label_rounded"] == 0
    assert sorted(p.name for p in (out / "data").iterdir()) == [f"train-{i:05d}-of-00003.parquet" for i in range(3)]
    assert (out / "README.md").is_file() and json.loads((out / MARKER).read_text())["rows"] == N_T2I
    assert "task_not_t2i:edit 2" in (out / "README.md").read_text()

    ds = load(out, tmp_path)
    assert len(ds) == N_T2I
    for name, dtype in PICKAPIC_COLUMNS.items():
        assert ds.features[name].dtype == dtype, name
    assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1"} <= set(ds.column_names)
    also = datasets.load_dataset("parquet", data_dir=str(out), cache_dir=str(tmp_path / "hf_cache"))["train"]
    assert also.features == ds.features and len(also) == N_T2I

    # corpus order: v1's referenced shards first, then v2's own
    assert ds["pair_id"] == [f"pair{i:03d}" for i in range(N_T2I)]
    assert set(ds["task"]) == {"t2i"} and set(ds["label_0"]) == {0.0, 0.5, 1.0}
    assert summary["label_0_mean"] == pytest.approx(sum(ds["label_0"]) / N_T2I)
    from PIL import Image

    for i, row in enumerate(ds):
        sample, _ = pair(i)
        assert row["jpg_0"] == sample["jpg_0.jpg"] and row["jpg_1"] == sample["jpg_1.jpg"]
        img = Image.open(io.BytesIO(row["jpg_0"]))
        assert img.format == "JPEG" and img.convert("RGB").getpixel((8, 8))[2] > 150
        assert row["label_0"] + row["label_1"] == 1.0 and row["has_label"] and row["are_different"]
        assert row["caption"] == f"prompt {i // 2}" and row["num_example_per_prompt"] == 2
        winner, loser = f"cand{i}w", f"cand{i}l"
        if row["label_0"] == 1.0:
            assert (row["image_0_uid"], row["image_1_uid"], row["best_image_uid"]) == (winner, loser, winner)
        elif row["label_0"] == 0.0:
            assert (row["image_0_uid"], row["image_1_uid"], row["best_image_uid"]) == (loser, winner, winner)
        else:
            assert row["best_image_uid"] == ""
        # model_0/model_1 are the generator ids of jpg_0/jpg_1 (the chosen image is jpg_0 unless label_0 == 0)
        chosen_first = row["label_0"] != 0.0
        assert (row["model_0"], row["model_1"]) == ((gen(i, True), gen(i, False)) if chosen_first
                                                    else (gen(i, False), gen(i, True)))
        assert row["__index_level_0__"] == i
    assert len(set(ds["ranking_id"])) == N_T2I and min(ds["ranking_id"]) >= 0


def test_diffusion_dpo_style_filter_and_transform(corpus_root, tmp_path):
    """What SalesforceAIResearch/DiffusionDPO train.py does with Pick-a-Pic: drop split decisions, then open both
    JPEGs and put the preferred one first (flip when ``label_0 == 0``)."""
    import numpy as np
    from PIL import Image

    export_pickapic(corpus_root, tmp_path / "out")
    ds = load(tmp_path / "out", tmp_path)
    strict = ds.filter(lambda x: x["label_0"] in (0, 1))
    assert len(strict) == N_T2I - TIES_T2I
    assert [m for m in strict["model_0"] if "dream" in m] == []  # --dreamlike_pairs_only: strings, never None
    assert len([m for m in strict["model_0"] if "winner" in m]) > 0  # ... that name the generators

    def preprocess(examples):
        pixels = []
        for b0, b1, label_0 in zip(examples["jpg_0"], examples["jpg_1"], examples["label_0"]):
            pair_ = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float32) for b in (b0, b1)]
            if label_0 == 0:
                pair_ = pair_[::-1]
            pixels.append(np.concatenate(pair_, axis=-1))
        examples["pixel_values"] = pixels
        return examples

    batch = strict.with_transform(preprocess)[:4]
    assert np.asarray(batch["pixel_values"][0]).shape == (16, 16, 6)
    # the preferred image comes first: winners are the blue-ish jpg_0 when label_0 == 1, else the red-ish jpg_1
    for px, label_0 in zip(batch["pixel_values"], batch["label_0"]):
        first = np.asarray(px)[8, 8, :3]
        assert (first[2] > 150) if label_0 == 1 else (first[0] > 150)


def test_drop_ties_and_balance(corpus_root, tmp_path):
    summary = export_pickapic(corpus_root / "v2", tmp_path / "strict", drop_ties=True, rows_per_file=1000)
    strict_n = N_T2I - TIES_T2I
    assert summary["rows"] == strict_n and summary["dropped_ties"] == TIES_T2I and summary["files"] == 1
    assert summary["left_out"] == {"task_not_t2i:edit": 2, "tie_dropped": TIES_T2I}
    ds = load(tmp_path / "strict", tmp_path)
    assert set(ds["label_0"]) == {0.0, 1.0} and all(a + b == 1 for a, b in zip(ds["label_0"], ds["label_1"]))
    # pairs of a prompt that lost a tie are counted without it
    counts = dict(zip(ds["prompt_id"], ds["num_example_per_prompt"]))
    assert counts["q1"] == 1 and counts["q0"] == 2
    assert 0.0 < summary["label_0_mean"] < 1.0

    t2i = export_pickapic(corpus_root, tmp_path / "t2i", tasks=["t2i"])
    assert t2i["rows"] == 24 and t2i["other_tasks"] == 2 and t2i["tasks"] == ["t2i"]
    assert set(load(tmp_path / "t2i", tmp_path)["task"]) == {"t2i"}

    every = export_pickapic(corpus_root, tmp_path / "all", tasks=None)
    assert every["rows"] == N and every["left_out"] == {} and every["tasks"] is None
    assert every["rows_by_task"] == {"edit": 2, "t2i": N_T2I}
    assert len(every["notes"]) == 1 and "2 edit pairs" in every["notes"][0] and "src.jpg" in every["notes"][0]


def test_export_is_deterministic_and_replaced_atomically(corpus_root, tmp_path):
    out = tmp_path / "pickapic"
    export_pickapic(corpus_root, out, rows_per_file=7)
    first = {p.name: p.read_bytes() for p in (out / "data").iterdir()}
    export_pickapic(corpus_root, out, rows_per_file=7)  # a previous export is replaced
    assert {p.name: p.read_bytes() for p in (out / "data").iterdir()} == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left behind

    other = tmp_path / "not_an_export"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        export_pickapic(corpus_root, other)
    assert (other / "precious.txt").read_text() == "keep me"

    sft = tmp_path / "sft" / "s1"
    sft.mkdir(parents=True)
    (sft / "manifest.json").write_text(json.dumps({"corpus": "sft_corpus", "shards": []}))
    with pytest.raises(ValueError, match="not a preference corpus"):
        export_pickapic(sft, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_index_that_disagrees_with_the_shards_fails_without_output(tmp_path):
    import polars as pl

    vdir = write_version(tmp_path / "c", "v1", [[pair(i) for i in range(6)]])
    pl.read_parquet(vdir / "index.parquet").head(5).write_parquet(vdir / "index.parquet")
    with pytest.raises(ValueError, match="not in index.parquet|disagree"):
        export_pickapic(vdir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export(corpus_root, tmp_path):
    from pipelines.cli import main

    out = tmp_path / "cli_out"
    data_root = corpus_root.parent.parent  # <data>/corpora/preference_corpus
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "export-pickapic", "--out", str(out),
                           "--data", str(data_root), "--drop-ties", "--tasks", "t2i,edit"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["version"] == "v2" and summary["rows"] == N - sum(1 for i in range(N) if i % 3 == 2)
    assert summary["tasks"] == ["edit", "t2i"] and summary["rows_by_task"]["edit"] == 2
    assert load(out, tmp_path).num_rows == summary["rows"]
    # what it left out, on stderr (stdout stays JSON)
    assert f"left out: tie_dropped={summary['dropped_ties']}" in proc.stderr and "note: 2 edit pairs" in proc.stderr

    assert main(["export-pickapic", "--out", str(tmp_path / "v1_out"), "--corpus-dir",
                 str(corpus_root / "v1"), "--rows-per-file", "5"]) == 0
    assert len(list((tmp_path / "v1_out" / "data").iterdir())) == 3
    assert main(["export-pickapic", "--out", str(tmp_path / "all_out"), "--corpus-dir", str(corpus_root),
                 "--tasks", "all"]) == 0
    assert json.loads((tmp_path / "all_out" / MARKER).read_text())["rows"] == N
    with pytest.raises(SystemExit):
        main(["export-pickapic"])  # --out is required


# ------------------------------------------------------------------------------------------------ soft labels
SOFT = ["0.73", "0.27", "0.6", "0.85", "0.75", "0.25", "1", "0", "0.5", "0.5000000000001", "0.9999999999", "0.1"]
ROUNDED = [0.5, 0.5, 0.5, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 1.0, 0.0]  # the nearest of 0, 0.5, 1
N_SOFT = 7  # not within 1e-9 of 0, 0.5 or 1


@pytest.fixture(scope="module")
def soft_corpus(tmp_path_factory) -> Path:
    """Bradley-Terry soft labels (and near-hard ones that are not soft), plus an edit pair with a soft label."""
    root = tmp_path_factory.mktemp("soft") / "preference_corpus"
    pairs = [pair(i, label_0=label) for i, label in enumerate(SOFT)] + [pair(len(SOFT), "0.8", task="edit")]
    write_version(root, "v1", [pairs[:7], pairs[7:]])
    return root


def test_hard_label_rounding():
    from pipelines.export import hard_label

    assert [hard_label(float(x)) for x in SOFT] == [(r, i not in (6, 7, 8, 9, 10)) for i, r in enumerate(ROUNDED)]
    for x in (0.0, 0.1, 0.25, 0.3, 0.5, 0.6, 0.75, 0.9, 1.0, 0.73):  # symmetric: swapping the images agrees
        assert hard_label(1 - x)[0] == 1 - hard_label(x)[0]


def test_soft_labels_rounded_with_a_count(soft_corpus, tmp_path):
    summary = export_pickapic(soft_corpus, tmp_path / "out")
    assert summary["rows"] == len(SOFT) and summary["soft_label_rounded"] == N_SOFT
    assert summary["left_out"] == {"task_not_t2i:edit": 1}  # the edit pair's soft label is not counted
    assert summary["ties"] == ROUNDED.count(0.5)
    ds = load(tmp_path / "out", tmp_path)
    assert ds["label_0"] == ROUNDED and set(ds["label_0"]) <= {0.0, 0.5, 1.0}
    assert ds["label_1"] == [1.0 - x for x in ROUNDED]
    assert "soft labels rounded to 0/0.5/1: 7" in (tmp_path / "out" / "README.md").read_text()
    # best_image_uid follows the rounded label: 0.85 -> jpg_0 wins, 0.25 -> jpg_1 wins, 0.73 -> a tie
    assert ds["best_image_uid"][3] == ds["image_0_uid"][3] and ds["best_image_uid"][5] == ds["image_1_uid"][5]
    assert ds["best_image_uid"][0] == ""

    # ties dropped after rounding; num_example_per_prompt (from the index) agrees with the rows
    strict = export_pickapic(soft_corpus, tmp_path / "strict", drop_ties=True)
    assert strict["rows"] == ROUNDED.count(0.0) + ROUNDED.count(1.0)
    assert strict["left_out"] == {"task_not_t2i:edit": 1, "tie_dropped": ROUNDED.count(0.5)}
    ds = load(tmp_path / "strict", tmp_path)
    assert set(ds["label_0"]) == {0.0, 1.0}
    per_prompt = {q: ds["prompt_id"].count(q) for q in set(ds["prompt_id"])}
    assert all(n == per_prompt[q] for q, n in zip(ds["prompt_id"], ds["num_example_per_prompt"]))

    every = export_pickapic(soft_corpus, tmp_path / "every", tasks=["t2i", "edit"])
    assert every["soft_label_rounded"] == N_SOFT + 1 and every["left_out"] == {}


def test_soft_labels_refused(soft_corpus, tmp_path):
    import polars as pl

    with pytest.raises(ValueError, match=r"7 pair\(s\) in index.parquet have a soft label_0.*pair000.*0\.73"):
        export_pickapic(soft_corpus, tmp_path / "out", soft_labels="refuse")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="soft_labels must be one of"):
        export_pickapic(soft_corpus, tmp_path / "out", soft_labels="keep")

    # only the pairs to export count: t2i pairs with hard labels export under "refuse"
    hard = tmp_path / "hard" / "preference_corpus"
    write_version(hard, "v1", [[pair(0), pair(1), pair(2), pair(3, "0.8", task="edit")]])
    assert export_pickapic(hard, tmp_path / "ok", soft_labels="refuse")["rows"] == 3

    # an index that does not show them (or no index): the shards are checked, nothing is written
    vdir = write_version(tmp_path / "c", "v1", [[pair(i, label_0=label) for i, label in enumerate(SOFT)]])
    index = pl.read_parquet(vdir / "index.parquet")
    index.with_columns(pl.Series("label_0", ROUNDED)).write_parquet(vdir / "index.parquet")
    with pytest.raises(ValueError, match=r"7 pair\(s\) in the shards.*pair000"):
        export_pickapic(vdir, tmp_path / "out2", soft_labels="refuse")
    assert not (tmp_path / "out2").exists()
    (vdir / "index.parquet").unlink()
    with pytest.raises(ValueError, match=r"7 pair\(s\) in the shards"):
        export_pickapic(vdir, tmp_path / "out3", soft_labels="refuse")
    assert not (tmp_path / "out3").exists()


def test_cli_soft_labels(soft_corpus, tmp_path, capsys):
    from pipelines.cli import main

    assert main(["export-pickapic", "--out", str(tmp_path / "r"), "--corpus-dir", str(soft_corpus),
                 "--soft-labels", "refuse"]) == 1
    assert "7 pair(s)" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert main(["export-pickapic", "--out", str(tmp_path / "o"), "--corpus-dir", str(soft_corpus)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["soft_label_rounded"] == N_SOFT
    assert "left out: task_not_t2i:edit=1; soft labels rounded: 7" in out.err


# ------------------------------------------------------------------------------------------------ tasks, models
def test_tasks_selected_explicitly(tmp_path):
    root = tmp_path / "preference_corpus"
    tasks = ["t2i", "edit", "multi_ref", "t2i", "multi_ref", "t2i"]
    write_version(root, "v1", [[pair(i, task=task) for i, task in enumerate(tasks)]])

    default = export_pickapic(root, tmp_path / "default")
    assert default["rows"] == 3 and default["rows_by_task"] == {"t2i": 3}
    assert default["left_out"] == {"task_not_t2i:edit": 1, "task_not_t2i:multi_ref": 2}

    some = export_pickapic(root, tmp_path / "some", tasks=["t2i", "edit"])
    assert some["rows"] == 4 and some["left_out"] == {"task_not_selected:multi_ref": 2}
    assert [n for n in some["notes"] if "edit" in n and "source image" in n] != []
    assert load(tmp_path / "some", tmp_path)["task"] == ["t2i", "edit", "t2i", "t2i"]

    every = export_pickapic(root, tmp_path / "every", tasks=None)
    assert every["rows"] == 6 and every["left_out"] == {}
    assert len(every["notes"]) == 2 and any("2 multi_ref pairs" in n and "ref_K.jpg" in n for n in every["notes"])

    with pytest.raises(ValueError, match="tasks must be some of"):
        export_pickapic(root, tmp_path / "x", tasks=["t2I"])
    with pytest.raises(ValueError, match="tasks must be some of"):
        export_pickapic(root, tmp_path / "x", tasks=[])


def test_models_empty_without_generator_ids(tmp_path):
    root = tmp_path / "preference_corpus"
    write_version(root, "v1", [[pair(i, generators=False) for i in range(4)]])
    export_pickapic(root, tmp_path / "out")
    ds = load(tmp_path / "out", tmp_path)
    assert ds["model_0"] == [""] * 4 and ds["model_1"] == [""] * 4


def test_preference_source_records_generator_ids(tmp_path):
    """The corpus builder puts the candidates' generator ids in the sample JSON, and the export makes them
    ``model_0``/``model_1`` in ``jpg_0``/``jpg_1`` order."""
    import polars as pl
    from PIL import Image

    from pipelines.corpus_sources import CorpusFilters, PreferenceSource
    from pipelines.export import _models
    from pipelines.paths import Layout

    layout, part = Layout(tmp_path / "data"), "batch1"
    shards = layout.asset_dir("candidate_images", part) / "shards"
    shards.mkdir(parents=True)
    colours = {"c0": (250, 0, 0), "c1": (0, 250, 0), "c2": (0, 0, 250), "c3": (250, 250, 0)}
    with wds.TarWriter(str(shards / "000000.tar")) as sink:
        for cid, colour in colours.items():
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
            sink.write({"__key__": cid, "png": buf.getvalue()})
    generators = {"c0": "gen-a", "c1": "gen-b", "c2": "gen-a", "c3": "gen-c"}
    pl.DataFrame({"candidate_id": list(generators), "generator_id": list(generators.values())}).write_parquet(
        layout.candidates(part))
    layout.pairs(part).parent.mkdir(parents=True)
    pl.DataFrame({"pair_id": ["p0", "p1"], "prompt_id": ["q0", "q0"], "chosen_id": ["c0", "c3"],
                  "rejected_id": ["c1", "c2"], "p_chosen": [0.9, 0.7], "margin": [1.0, 0.5],
                  "strategy": ["all", "all"], "label": [1.0, 0.7]}).write_parquet(layout.pairs(part))
    prompts = {"q0": {"task": "t2i", "text": "a cat", "source_image": None, "reference_images": [],
                      "reference_types": []}}
    source = PreferenceSource(layout, prompts, seed=0, filters=CorpusFilters({}))
    samples = list(source.samples(part, Counter()))
    assert len(samples) == 2 and {s["__key__"] for s, _ in samples} == {"p0", "p1"}
    firsts = set()
    for sample, _ in samples:
        meta = json.loads(sample["json"])
        chosen, rejected = generators[meta["chosen_id"]], generators[meta["rejected_id"]]
        assert (meta["chosen_generator_id"], meta["rejected_generator_id"]) == (chosen, rejected)
        firsts.add(meta["chosen_is_jpg_0"])
        assert _models(meta) == ((chosen, rejected) if meta["chosen_is_jpg_0"] else (rejected, chosen))
    assert firsts == {True, False}  # jpg_0 alternates, so both orders are checked
