"""Small corpora for the trainer tests, in the layout the corpus writer produces (``shards/NNNNNN.tar`` +
``index.parquet`` + ``manifest.json``), written directly so each test controls every sample."""

from __future__ import annotations

import io
import json
from pathlib import Path

CAPTIONS = ["a red square", "a blue circle", "a green field", "a yellow sun", "a black cat", "a white dog"]
COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (240, 220, 20), (10, 10, 10), (245, 245, 245)]


def noisy_jpeg(colour, seed: int, size: int = 64) -> bytes:
    """A ``size``×``size`` JPEG of ``colour`` with seeded Gaussian noise (sd 25)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (size, size, 3)), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_corpus(root: Path, samples: list[dict], per_shard: int) -> str:
    """Write ``samples`` (webdataset dicts) into shards of ``per_shard``; returns the version directory."""
    import polars as pl
    import webdataset as wds

    from pipelines.corpora import SCHEMA_VERSION

    (root / "shards").mkdir(parents=True)
    rows, shards = [], []
    for i in range(0, len(samples), per_shard):
        name = f"shards/{i // per_shard:06d}.tar"
        chunk = samples[i : i + per_shard]
        with wds.TarWriter(str(root / name)) as sink:
            for sample in chunk:
                sink.write(sample)
                rows.append({"key": sample["__key__"], "shard": name})
        shards.append({"path": name, "count": len(chunk)})
    pl.DataFrame(rows).write_parquet(root / "index.parquet")
    (root / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "shards": shards,
                                                    "num_samples": len(samples)}))
    return str(root)
