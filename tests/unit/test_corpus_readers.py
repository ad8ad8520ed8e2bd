"""The webdataset reader (``trainers.data.corpus_dataset``) and the shard resolution under it, on corpora in the
writer's format: ``manifest.json`` whose ``shards[*].path`` is relative to the version directory (and may point
into an older version), ``index.parquet``, a ``latest`` pointer, local or behind an fsspec URL.

Checks: one epoch reads every sample exactly once with DataLoader workers and across nodes, seeds fix the order,
resampling draws with replacement forever, a refreshed version reads the shards it references in an older one,
``memory://`` (and S3 through moto, when it starts) read like local files, and the generator readers the trainers
use still read this format.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections import Counter
from functools import partial
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
wds = pytest.importorskip("webdataset")

from trainers.data import (  # noqa: E402
    collate_preference,
    collate_sft,
    corpus_dataset,
    corpus_shards,
    corpus_size,
    corpus_version_dir,
    node_rank_world,
    preference_samples,
    sft_samples,
)


# --------------------------------------------------------------------------------------------- corpus helpers
def _jpeg(colour: tuple[int, int, int], size: int = 16) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def pref_sample(i: int) -> tuple[dict, dict]:
    """A Pick-a-Pic layout sample and its index row; the images' colours encode ``i``."""
    label_0 = ["1", "0", "0.5"][i % 3]
    label_1 = {"1": "0", "0": "1", "0.5": "0.5"}[label_0]
    chosen_first = label_0 != "0"
    meta = {"pair_id": f"p{i:04d}", "prompt_id": f"q{i // 2}", "chosen_id": f"c{i}a", "rejected_id": f"c{i}b",
            "chosen_is_jpg_0": chosen_first, "label": 0.5 if label_0 == "0.5" else 1.0}
    sample = {"__key__": f"p{i:04d}", "jpg_0.jpg": _jpeg((i * 7 % 256, 10, 200)),
              "jpg_1.jpg": _jpeg((200, i * 7 % 256, 10)), "caption.txt": f"caption {i}", "label_0.txt": label_0,
              "label_1.txt": label_1, "json": json.dumps(meta).encode()}
    row = {"pair_id": meta["pair_id"], "prompt_id": meta["prompt_id"], "task": "t2i", "label_0": float(label_0),
           "caption": f"caption {i}"}
    return sample, row


def sft_sample(i: int) -> tuple[dict, dict]:
    meta = {"candidate_id": f"c{i}", "prompt_id": f"q{i}", "reward": 0.5 + i / 100}
    sample = {"__key__": f"s{i:04d}", "jpg": _jpeg((i * 5 % 256, 90, 90)), "txt": f"caption {i}",
              "json": json.dumps(meta).encode()}
    return sample, {"candidate_id": f"c{i}", "prompt_id": f"q{i}", "task": "t2i", "reward": meta["reward"]}


def write_version(corpus_root: Path, version: str, chunks: list[list[tuple[dict, dict]]], *,
                  corpus: str = "preference_corpus", reuse: tuple[str, list[int]] | None = None) -> Path:
    """A corpus version as the writer lays it out: new shards under ``<version>/shards``, plus (``reuse``) shards
    of an older version referenced as ``../<old>/shards/NNNNNN.tar`` with their index rows; moves ``latest``."""
    import polars as pl

    vdir = corpus_root / version
    (vdir / "shards").mkdir(parents=True)
    shards, rows = [], []
    if reuse is not None:
        old, positions = reuse
        old_manifest = json.loads((corpus_root / old / "manifest.json").read_text())
        old_index = pl.read_parquet(corpus_root / old / "index.parquet")
        for pos in positions:
            entry = dict(old_manifest["shards"][pos])
            ref = f"../{old}/{entry['path']}"
            shards.append({**entry, "path": ref})
            rows += [{**r, "shard": ref} for r in old_index.filter(pl.col("shard") == entry["path"]).to_dicts()]
    for n, chunk in enumerate(chunks):
        name = f"{n:06d}.tar"
        with wds.TarWriter(str(vdir / "shards" / name)) as sink:
            for sample, _ in chunk:
                sink.write(sample)
        data = (vdir / "shards" / name).read_bytes()
        layout = "t2i:" + ",".join(sorted(k for k in chunk[0][0] if not k.startswith("__")))
        shards.append({"path": f"shards/{name}", "shard": name, "sha256": "-", "count": len(chunk),
                       "bytes": len(data), "layout": layout, "partition": f"batch_{version}"})
        rows += [{**row, "shard": f"shards/{name}", "key": sample["__key__"]} for sample, row in chunk]
    layouts: dict[str, list[str]] = {}
    for shard in shards:
        layouts.setdefault(shard["layout"], []).append(shard["path"])
    manifest = {"schema_version": 2, "corpus": corpus, "version": version, "num_samples": len(rows),
                "shards": shards, "layouts": layouts, "drops": {}, "inputs": [], "config": {}}
    (vdir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    pl.DataFrame(rows).write_parquet(vdir / "index.parquet")
    (corpus_root / "latest").write_text(version + "\n")
    return vdir


def chunked(samples: list, size: int) -> list[list]:
    return [samples[i: i + size] for i in range(0, len(samples), size)]


@pytest.fixture(scope="module")
def pref_root(tmp_path_factory) -> Path:
    """Version ``v1``: 24 pairs in 6 shards; version ``v2``: 10 new pairs in 3 shards + 3 shards of ``v1``."""
    root = tmp_path_factory.mktemp("preference_corpus")
    write_version(root, "v1", chunked([pref_sample(i) for i in range(24)], 4))
    write_version(root, "v2", chunked([pref_sample(i) for i in range(100, 110)], 4), reuse=("v1", [0, 2, 5]))
    return root


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft_corpus")
    return write_version(root, "s1", chunked([sft_sample(i) for i in range(9)], 3), corpus="sft_corpus")


def keys(ds) -> list[str]:
    return [s["__key__"] for s in ds]


V1_KEYS = [f"p{i:04d}" for i in range(24)]
V2_IDS = [0, 1, 2, 3, 8, 9, 10, 11, 20, 21, 22, 23] + list(range(100, 110))  # manifest order: reused shards first
V2_KEYS = sorted(f"p{i:04d}" for i in V2_IDS)


# --------------------------------------------------------------------------------------------- shard resolution
def test_manifest_referencing_an_older_version(pref_root):
    shards = corpus_shards(pref_root / "v2")
    assert shards[:3] == [str((pref_root / "v1" / "shards" / f"{n:06d}.tar").resolve()) for n in (0, 2, 5)]
    assert shards[3:] == [str((pref_root / "v2" / "shards" / f"{n:06d}.tar").resolve()) for n in range(3)]
    assert corpus_size(pref_root / "v2") == 22
    ds = corpus_dataset(pref_root / "v2", kind="raw", shuffle=False)
    assert keys(ds) == [f"p{i:04d}" for i in V2_IDS]
    assert ds.num_samples == 22 and len(ds.shards) == 6


def test_latest_pointer_and_missing_shard(pref_root, tmp_path):
    assert corpus_version_dir(pref_root) == str(pref_root / "v2")
    assert corpus_version_dir(pref_root / "v1") == str(pref_root / "v1")
    broken = write_version(tmp_path, "b1", chunked([pref_sample(i) for i in range(4)], 2))
    (broken / "shards" / "000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="000001.tar"):
        corpus_shards(broken)


# --------------------------------------------------------------------------------------------- splitting
def test_one_epoch_with_dataloader_workers_reads_every_sample_once(pref_root):
    ds = corpus_dataset(pref_root / "v1", kind="raw", seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    seen = [s["__key__"] for s in loader]
    assert sorted(seen) == V1_KEYS  # exactly once: no duplicates, nothing missing


def test_decoded_batches_with_the_existing_collate(pref_root, sft_dir):
    ds = corpus_dataset(pref_root / "v1", kind="preference", seed=1, drop_ties=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2,
                                         collate_fn=partial(collate_preference, resolution=8))
    batches = list(loader)
    assert sum(len(b["captions"]) for b in batches) == 16  # 24 pairs, 8 ties dropped
    assert batches[0]["pixels_w"].shape == (len(batches[0]["captions"]), 3, 8, 8)
    assert all(float(b["label_w"].min()) == 1.0 for b in batches)

    img_0, img_1, caption, label_0, label_1, meta = next(iter(corpus_dataset(pref_root / "v1", shuffle=False)))
    assert meta["_src"] is None and meta["_refs"] == []  # a t2i pair conditions on no image
    assert caption == "caption 0" and (label_0, label_1) == (1.0, 0.0)
    assert img_0.getpixel((8, 8))[2] > 150 and img_1.getpixel((8, 8))[0] > 150
    raw_0, *_ = next(iter(corpus_dataset(pref_root / "v1", shuffle=False, decode=False)))
    assert isinstance(raw_0, bytes) and raw_0[:2] == b"\xff\xd8"

    sft = corpus_dataset(sft_dir, kind="sft", seed=0)
    out = list(torch.utils.data.DataLoader(sft, batch_size=3, num_workers=2,
                                           collate_fn=partial(collate_sft, resolution=8)))
    metas = [m for b in out for m in b["meta"]]
    assert sorted(m["candidate_id"] for m in metas) == [f"c{i}" for i in range(9)]
    assert out[0]["pixels"].shape[1:] == (3, 8, 8)


def test_node_split_partitions_the_samples(pref_root):
    parts = [keys(corpus_dataset(pref_root / "v1", kind="raw", seed=5, rank=r, world_size=2)) for r in (0, 1)]
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == V1_KEYS
    # nodes x workers: 2 nodes with 2 DataLoader workers each still read every sample once
    seen = []
    for r in (0, 1):
        ds = corpus_dataset(pref_root / "v1", kind="raw", seed=5, rank=r, world_size=2)
        seen += [s["__key__"] for s in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)]
    assert sorted(seen) == V1_KEYS
    with pytest.raises(ValueError, match="resampled=True"):
        corpus_dataset(pref_root / "v1", kind="raw", rank=0, world_size=7)


def test_rank_and_world_size_defaults(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert node_rank_world() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert node_rank_world() == (1, 4)
    assert node_rank_world(0, 2) == (0, 2)
    with pytest.raises(ValueError):
        node_rank_world(rank=1)
    with pytest.raises(ValueError):
        node_rank_world(2, 2)


# --------------------------------------------------------------------------------------------- shuffling
def test_seed_fixes_the_order(pref_root):
    a = keys(corpus_dataset(pref_root / "v1", kind="raw", seed=11))
    b = keys(corpus_dataset(pref_root / "v1", kind="raw", seed=11))
    c = keys(corpus_dataset(pref_root / "v1", kind="raw", seed=12))
    assert a == b and a != c and sorted(a) == sorted(c) == V1_KEYS
    assert a != V1_KEYS  # shuffled at all
    assert keys(corpus_dataset(pref_root / "v1", kind="raw", shuffle=False)) == V1_KEYS

    ds = corpus_dataset(pref_root / "v1", kind="raw", seed=11)
    first = keys(ds)
    ds.set_epoch(1)
    second = keys(ds)
    assert first == a and second != first and sorted(second) == V1_KEYS
    assert second == keys(corpus_dataset(pref_root / "v1", kind="raw", seed=11, epoch=1))


def test_resampled_is_infinite_and_draws_with_replacement(pref_root):
    from itertools import islice

    ds = corpus_dataset(pref_root / "v1", kind="raw", seed=2, resampled=True, shuffle_buffer=8)
    drawn = [s["__key__"] for s in islice(iter(ds), 200)]  # > 24 samples in the corpus
    assert len(drawn) == 200 and set(drawn) <= set(V1_KEYS)
    counts = Counter(drawn)
    assert max(counts.values()) > 200 // 24 + 1  # with replacement: some pairs come far more than evenly
    again = [s["__key__"] for s in islice(iter(corpus_dataset(pref_root / "v1", kind="raw", seed=2, resampled=True,
                                                               shuffle_buffer=8)), 200)]
    assert again == drawn  # seeded
    # ranks draw different streams (and need not split shards evenly)
    other = [s["__key__"] for s in islice(iter(corpus_dataset(pref_root / "v1", kind="raw", seed=2, resampled=True,
                                                               shuffle_buffer=8, rank=1, world_size=2)), 200)]
    assert other != drawn
    with_epoch = corpus_dataset(pref_root / "v1", kind="raw", seed=2, resampled=True).with_epoch(30)
    assert len(keys(with_epoch)) == 30


def test_pipeline_pickles_for_spawned_workers(pref_root):
    """DataLoader workers started with spawn/forkserver (the default from Python 3.14) get a pickled copy."""
    import pickle

    ds = corpus_dataset(pref_root / "v1", kind="preference", seed=4, decode=False)
    copy = pickle.loads(pickle.dumps(ds))
    assert [t[2] for t in copy] == [t[2] for t in ds]


# --------------------------------------------------------------------------------------------- URLs
def test_memory_url_corpus(pref_root):
    import fsspec

    fs = fsspec.filesystem("memory")
    base = f"memory://prefmill-test-{uuid.uuid4().hex}/preference_corpus"
    try:
        for version in ("v1", "v2"):
            fs.put(str(pref_root / version), f"{base}/{version}", recursive=True)
        fs.pipe(f"{base}/latest", b"v2\n")
        version_dir = corpus_version_dir(base)
        assert version_dir == f"{base}/v2"
        shards = corpus_shards(version_dir)
        assert shards[0] == f"{base}/v1/shards/000000.tar" and shards[3] == f"{base}/v2/shards/000000.tar"
        assert corpus_size(version_dir) == 22
        assert keys(corpus_dataset(version_dir, kind="raw", shuffle=False)) == keys(
            corpus_dataset(pref_root / "v2", kind="raw", shuffle=False))
        loader = torch.utils.data.DataLoader(corpus_dataset(version_dir, kind="raw", seed=0), batch_size=None,
                                             num_workers=2)
        assert sorted(s["__key__"] for s in loader) == V2_KEYS
        # the generator readers take URLs too
        assert len(list(preference_samples(version_dir))) == 22
    finally:
        fs.rm(base.split("://", 1)[1].split("/", 1)[0], recursive=True)


@pytest.fixture
def moto_s3(monkeypatch):
    """An S3 endpoint from moto's threaded server, on a free port; skipped when moto or s3fs is missing or the
    server does not start."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    try:
        server.start()
        host, port = server.get_host_and_port()
    except Exception as exn:  # noqa: BLE001 - any failure to start means: no S3 here
        pytest.skip(f"moto server did not start: {exn!r}")
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_s3_corpus_through_moto(pref_root, moto_s3):
    import s3fs

    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": moto_s3}}
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    bucket = f"prefmill-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    for version in ("v1", "v2"):
        for path in sorted((pref_root / version).rglob("*")):
            if path.is_file():
                fs.pipe(f"{bucket}/preference_corpus/{version}/{path.relative_to(pref_root / version)}",
                        path.read_bytes())
    fs.pipe(f"{bucket}/preference_corpus/latest", b"v2\n")
    base = f"s3://{bucket}/preference_corpus"
    version_dir = corpus_version_dir(base, storage_options=options)
    assert version_dir == f"{base}/v2"
    assert corpus_shards(version_dir, storage_options=options)[0] == f"{base}/v1/shards/000000.tar"
    ds = corpus_dataset(version_dir, kind="raw", seed=0, storage_options=options)
    assert sorted(keys(ds)) == V2_KEYS
    first = next(iter(corpus_dataset(version_dir, kind="preference", shuffle=False, storage_options=options)))
    assert first[2] == "caption 0"


# --------------------------------------------------------------------------------------------- existing readers
def test_generator_readers_read_this_format(pref_root, sft_dir):
    pairs = list(preference_samples(pref_root / "v2"))
    assert len(pairs) == 22 and pairs[0][2] == "caption 0"
    ties = sum(1 for i in V2_IDS if i % 3 == 2)
    assert len(list(preference_samples(pref_root / "v2", drop_ties=True))) == 22 - ties
    shuffled = [p[2] for p in preference_samples(pref_root / "v2", shuffle_seed=3)]
    assert sorted(shuffled) == sorted(p[2] for p in pairs) and shuffled != [p[2] for p in pairs]
    items = list(sft_samples(sft_dir))
    assert [m["candidate_id"] for _, _, m in items] == [f"c{i}" for i in range(9)]
    assert os.path.isabs(corpus_shards(sft_dir)[0])
