"""Versioned WebDataset corpora (DESIGN.md): ``<corpus>/<version>/{shards/NNNNNN.tar, index.parquet,
manifest.json}``, the version a content hash of the inputs and the config, the whole directory written in a
temporary sibling and renamed, then the ``latest`` pointer moved. A version that already exists is reused.

Shards are cut per layout (task + member names; see :func:`sample_layout`) and the manifest lists the shards of
each layout under ``layouts``, so ``datasets.load_dataset("webdataset", data_files=<one layout's shards>)`` works."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from labelers.hashing import content_id

SCHEMA_VERSION = 1
LATEST = "latest"


def corpus_version(corpus: str, inputs: dict[str, str], config: dict[str, Any]) -> str:
    """``inputs`` maps each input partition to the sha256 of the files it contributed."""
    return content_id("corpus", corpus, SCHEMA_VERSION, sorted(inputs.items()), config)[:16]


def latest_version(corpus_root: Path) -> str | None:
    pointer = Path(corpus_root) / LATEST
    return pointer.read_text().strip() if pointer.exists() else None


def read_manifest(version_dir: Path) -> dict[str, Any]:
    import json

    return json.loads((Path(version_dir) / "manifest.json").read_text())


def write_corpus(
    corpus_root: Path,
    corpus: str,
    version: str,
    samples: Iterable[tuple[dict[str, Any], dict[str, Any]]],
    shard_max_samples: int,
    manifest_extra: dict[str, Any],
    drops: Counter,
) -> tuple[Path, dict[str, Any], bool]:
    """Write ``(sample, index_row)`` pairs into a new version directory. Returns (dir, manifest, created)."""
    import polars as pl

    from pipelines.io import atomic_dir, write_json, write_parquet, write_shard

    corpus_root = Path(corpus_root)
    final = corpus_root / version
    if (final / "manifest.json").exists():
        _point_latest(corpus_root, version)
        return final, read_manifest(final), False
    shards: list[dict[str, Any]] = []
    index_rows: list[dict[str, Any]] = []
    with atomic_dir(final) as tmp:
        (tmp / "shards").mkdir()

        def flush(layout: str, chunk: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
            name = f"{len(shards):06d}.tar"
            info = write_shard(tmp / "shards" / name, (sample for sample, _ in chunk))
            shards.append({**info, "layout": layout})
            index_rows.extend({**row, "shard": f"shards/{name}", "key": sample["__key__"]} for sample, row in chunk)

        for layout, chunk in _chunks_by_layout(samples, shard_max_samples):
            flush(layout, chunk)
        index = pl.DataFrame(index_rows) if index_rows else pl.DataFrame(schema={"shard": pl.String, "key": pl.String})
        write_parquet(index, tmp / "index.parquet")
        layouts: dict[str, list[str]] = {}
        for shard in shards:
            layouts.setdefault(shard["layout"], []).append(f"shards/{shard['shard']}")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "corpus": corpus,
            "version": version,
            "num_samples": len(index_rows),
            "shards": shards,
            "layouts": layouts,
            "drops": dict(sorted(drops.items())),
            **manifest_extra,
        }
        write_json(manifest, tmp / "manifest.json")
    _point_latest(corpus_root, version)
    return final, manifest, True


def _point_latest(corpus_root: Path, version: str) -> None:
    from pipelines.io import atomic_path

    with atomic_path(corpus_root / LATEST) as tmp:
        tmp.write_text(version + "\n")


def sample_layout(sample: dict[str, Any], row: dict[str, Any]) -> str:
    """A shard holds samples of one layout: the same task and the same members. Readers that infer a schema
    from the first samples (``datasets.load_dataset("webdataset", ...)``) need that: members and JSON fields
    that differ between samples of one shard make them fail."""
    members = ",".join(sorted(k for k in sample if not k.startswith("__")))
    return f"{row.get('task', 'any')}:{members}"


def _chunks_by_layout(samples: Iterable[tuple[dict[str, Any], dict[str, Any]]],
                      size: int) -> Iterator[tuple[str, list[Any]]]:
    pending: dict[str, list[Any]] = {}
    for sample, row in samples:
        layout = sample_layout(sample, row)
        chunk = pending.setdefault(layout, [])
        chunk.append((sample, row))
        if len(chunk) >= size:
            yield layout, pending.pop(layout)
    for layout in sorted(pending):
        yield layout, pending[layout]


def sft_samples(labels, prompts_by_id, images, min_reward: float, drops: Counter):
    """SFT samples (``jpg, txt, json``) from ok labels whose reward is at least ``min_reward``."""
    import json

    from pipelines.io import encode_image

    for row in labels.iter_rows(named=True):
        if row["status"] != "ok":
            drops[f"label_{row['status']}"] += 1
            continue
        if row["reward"] is None or row["reward"] < min_reward:
            drops["below_reward_threshold"] += 1
            continue
        image = images.get(row["candidate_id"])
        if image is None or isinstance(image, Exception):
            drops["image_unreadable"] += 1
            continue
        prompt = prompts_by_id[row["prompt_id"]]
        meta = {k: v for k, v in row.items() if k != "raw_judgement"}
        meta.update(task=prompt["task"], text=prompt["text"])
        sample = {"__key__": row["candidate_id"], "jpg": encode_image(image, "jpg"), "txt": prompt["text"],
                  "json": json.dumps(meta, default=str).encode()}
        yield sample, {"candidate_id": row["candidate_id"], "prompt_id": row["prompt_id"], "task": prompt["task"],
                       "reward": row["reward"]}


def preference_samples(pairs, prompts_by_id, images, seed: int, drops: Counter):
    """Pick-a-Pic style samples. Which image is ``jpg_0`` is drawn per pair from ``seed`` and the pair id, so the
    layout is reproducible and ``label_0`` is balanced."""
    import json

    from PIL import Image

    from pipelines.io import encode_image

    for pair in pairs.iter_rows(named=True):
        chosen, rejected = images.get(pair["chosen_id"]), images.get(pair["rejected_id"])
        if chosen is None or rejected is None or isinstance(chosen, Exception) or isinstance(rejected, Exception):
            drops["image_unreadable"] += 1
            continue
        prompt = prompts_by_id[pair["prompt_id"]]
        chosen_first = random.Random(f"{seed}:{pair['pair_id']}").random() < 0.5
        first, second = (chosen, rejected) if chosen_first else (rejected, chosen)
        label = float(pair["label"])
        label_0 = label if chosen_first else 1.0 - label
        sample = {
            "__key__": pair["pair_id"],
            "jpg_0.jpg": encode_image(first, "jpg"),
            "jpg_1.jpg": encode_image(second, "jpg"),
            "caption.txt": prompt["text"],
            "label_0.txt": _label_text(label_0),
            "label_1.txt": _label_text(1.0 - label_0),
            "json": json.dumps({**pair, "task": prompt["task"], "chosen_is_jpg_0": chosen_first,
                                "reference_types": prompt["reference_types"]}, default=str).encode(),
        }
        if prompt["source_image"]:
            with Image.open(prompt["source_image"]) as src:
                sample["src.jpg"] = encode_image(src.convert("RGB"), "jpg")
        for k, ref_path in enumerate(prompt["reference_images"]):
            with Image.open(ref_path) as ref:
                sample[f"ref_{k}.jpg"] = encode_image(ref.convert("RGB"), "jpg")
        yield sample, {"pair_id": pair["pair_id"], "prompt_id": pair["prompt_id"], "task": prompt["task"],
                       "label_0": label_0, "caption": prompt["text"]}


def _label_text(value: float) -> str:
    return "0.5" if value == 0.5 else str(int(value))


def verify_corpus(version_dir: Path) -> list[str]:
    """Re-read every shard: its sha256 and sample count must match the manifest, and the index must name every
    sample. Returns the problems found (empty when the corpus is intact)."""
    import polars as pl

    from pipelines.io import file_sha256, read_shard

    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir)
    problems: list[str] = []
    keys: list[str] = []
    for shard in manifest["shards"]:
        path = version_dir / "shards" / shard["shard"]
        if not path.exists():
            problems.append(f"{shard['shard']}: missing")
            continue
        if file_sha256(path) != shard["sha256"]:
            problems.append(f"{shard['shard']}: sha256 differs from the manifest")
        shard_keys = [sample["__key__"] for sample in read_shard(path)]
        if len(shard_keys) != shard["count"]:
            problems.append(f"{shard['shard']}: {len(shard_keys)} samples, manifest says {shard['count']}")
        keys += shard_keys
    index = pl.read_parquet(version_dir / "index.parquet")
    if sorted(index["key"].to_list()) != sorted(keys):
        problems.append(f"index.parquet lists {len(index)} samples, the shards hold {len(keys)}")
    if len(set(keys)) != len(keys):
        problems.append(f"{len(keys) - len(set(keys))} duplicate sample keys")
    return problems
