"""The Pick-a-Pic export (``pipelines.export.export_pickapic`` and ``python -m pipelines.cli export-pickapic``).

Checks: the export loads with ``datasets`` with Pick-a-Pic v2's column names and dtypes, the JPEG bytes decode to
the corpus' images, labels sum to one, ties can be dropped, the ids line up with the corpus, a Diffusion-DPO style
filter/transform runs on it, it is deterministic and replaced atomically, and the CLI prints its summary.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

wds = pytest.importorskip("webdataset")
datasets = pytest.importorskip("datasets")

from pipelines.export import MARKER, PICKAPIC_COLUMNS, export_pickapic  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
N = 26  # pairs in the corpus: i % 3 == 2 are ties; the last two (one prompt) are image edits


def _jpeg(colour, size: int = 16) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def pair(i: int) -> tuple[dict, dict]:
    """A Pick-a-Pic layout sample as the writer makes it (``jpg_0`` is the chosen image when
    ``chosen_is_jpg_0``), and its index row; two pairs per prompt."""
    label_0 = ["1", "0", "0.5"][i % 3]
    task = "edit" if i >= 24 else "t2i"
    chosen_first = label_0 != "0"
    meta = {"pair_id": f"pair{i:03d}", "prompt_id": f"q{i // 2}", "chosen_id": f"cand{i}w",
            "rejected_id": f"cand{i}l", "chosen_is_jpg_0": chosen_first, "task": task,
            "label": 0.5 if label_0 == "0.5" else 1.0}
    sample = {"__key__": meta["pair_id"], "jpg_0.jpg": _jpeg((10 * (i % 25), 20, 200)),
              "jpg_1.jpg": _jpeg((200, 10 * (i % 25), 20)), "caption.txt": f"prompt {i // 2}",
              "label_0.txt": label_0, "label_1.txt": {"1": "0", "0": "1", "0.5": "0.5"}[label_0],
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
    ties = sum(1 for i in range(N) if i % 3 == 2)
    assert summary["rows"] == N and summary["files"] == 3 and summary["ties"] == ties
    assert summary["dropped_ties"] == 0 and summary["version"] == "v2"
    assert sorted(p.name for p in (out / "data").iterdir()) == [f"train-{i:05d}-of-00003.parquet" for i in range(3)]
    assert (out / "README.md").is_file() and json.loads((out / MARKER).read_text())["rows"] == N

    ds = load(out, tmp_path)
    assert len(ds) == N
    for name, dtype in PICKAPIC_COLUMNS.items():
        assert ds.features[name].dtype == dtype, name
    assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1"} <= set(ds.column_names)
    also = datasets.load_dataset("parquet", data_dir=str(out), cache_dir=str(tmp_path / "hf_cache"))["train"]
    assert also.features == ds.features and len(also) == N

    # corpus order: v1's referenced shards first, then v2's own
    assert ds["pair_id"] == [f"pair{i:03d}" for i in range(N)]
    assert summary["label_0_mean"] == pytest.approx(sum(ds["label_0"]) / N)
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
        assert row["model_0"] == "" and row["__index_level_0__"] == i
    assert len(set(ds["ranking_id"])) == N and min(ds["ranking_id"]) >= 0


def test_diffusion_dpo_style_filter_and_transform(corpus_root, tmp_path):
    """What SalesforceAIResearch/DiffusionDPO train.py does with Pick-a-Pic: drop split decisions, then open both
    JPEGs and put the preferred one first (flip when ``label_0 == 0``)."""
    import numpy as np
    from PIL import Image

    export_pickapic(corpus_root, tmp_path / "out")
    ds = load(tmp_path / "out", tmp_path)
    strict = ds.filter(lambda x: x["label_0"] in (0, 1))
    assert len(strict) == N - sum(1 for i in range(N) if i % 3 == 2)
    assert [m for m in strict["model_0"] if "dream" in m] == []  # --dreamlike_pairs_only: strings, never None

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
    strict_n = N - sum(1 for i in range(N) if i % 3 == 2)
    assert summary["rows"] == strict_n and summary["dropped_ties"] == N - strict_n and summary["files"] == 1
    ds = load(tmp_path / "strict", tmp_path)
    assert set(ds["label_0"]) == {0.0, 1.0} and all(a + b == 1 for a, b in zip(ds["label_0"], ds["label_1"]))
    # pairs of a prompt that lost a tie are counted without it
    counts = dict(zip(ds["prompt_id"], ds["num_example_per_prompt"]))
    assert counts["q1"] == 1 and counts["q0"] == 2
    assert 0.0 < summary["label_0_mean"] < 1.0

    t2i = export_pickapic(corpus_root, tmp_path / "t2i", tasks=["t2i"])
    assert t2i["rows"] == 24 and t2i["other_tasks"] == 2 and t2i["tasks"] == ["t2i"]
    assert set(load(tmp_path / "t2i", tmp_path)["task"]) == {"t2i"}


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
    assert load(out, tmp_path).num_rows == summary["rows"]

    assert main(["export-pickapic", "--out", str(tmp_path / "v1_out"), "--corpus-dir",
                 str(corpus_root / "v1"), "--rows-per-file", "5"]) == 0
    assert len(list((tmp_path / "v1_out" / "data").iterdir())) == 3
    with pytest.raises(SystemExit):
        main(["export-pickapic"])  # --out is required
