"""Export the preference corpus to a Hugging Face dataset with Pick-a-Pic v2's columns.

Diffusion-DPO's training script (SalesforceAIResearch/DiffusionDPO ``train.py``) and PickScore's trainer read
Pick-a-Pic (``yuvalkirstain/pickapic_v2``) through ``datasets.load_dataset(name_or_dir)``, so a corpus exported in
that shape trains with them unchanged (``--dataset_name <out_dir>``). What they read:

- Diffusion-DPO: ``jpg_0``/``jpg_1`` (JPEG bytes, opened with ``Image.open(io.BytesIO(...))``), ``label_0`` (the
  pair is flipped when ``label_0 == 0``, so ``jpg_0`` is the winner otherwise), ``caption``; ties are removed with
  ``label_0 in (0, 1)`` -- but only when the dataset name contains ``pickapic`` -- and ``model_0``/``model_1`` are
  substring-tested (``'dream' in m0``) by ``--dreamlike_pairs_only``, so they must be strings.
- PickScore: ``jpg_0``/``jpg_1``, ``label_0``/``label_1``, ``caption``, ``num_example_per_prompt`` (made a tensor,
  so an integer), filters on ``has_label`` and ``are_different``, ``image_0_uid``/``image_1_uid``, and drops the
  pandas artefact ``__index_level_0__`` when limiting examples per prompt.

Pick-a-Pic v2's features (dataset card): ``are_different`` bool, ``best_image_uid`` string, ``caption`` string,
``created_at`` timestamp[ns], ``has_label`` bool, ``image_0_uid``/``image_1_uid``/``image_0_url``/``image_1_url``
string, ``jpg_0``/``jpg_1`` binary, ``label_0``/``label_1`` float64, ``model_0``/``model_1`` string,
``ranking_id``/``user_id``/``num_example_per_prompt``/``__index_level_0__`` int64. The export fills those it can
fill meaningfully, with the same dtypes (see :func:`pickapic_features`), and leaves out ``created_at``,
``user_id`` and the image URLs (no humans, no web app) rather than invent them; it adds prefmill's ``pair_id``,
``prompt_id`` and ``task`` for tracing a row back to the corpus.

The output is HF-hub shaped (``data/train-00000-of-0000N.parquet`` + a ``README.md`` dataset card whose ``configs``
name the files), written into a temporary sibling and renamed into place, so a reader never sees half an export.
Rows are in corpus (manifest) order, so the same corpus version gives the same files.

datasets, pyarrow and polars are imported inside functions.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROWS_PER_FILE = 1000
ROW_GROUP_ROWS = 100  # small row groups: image rows are large, and readers stream a row group at a time
MARKER = "prefmill_export.json"  # provenance, and what tells a previous export (safe to replace) from other data

# name -> datasets dtype, in Pick-a-Pic v2's column order, then prefmill's columns
PICKAPIC_COLUMNS: dict[str, str] = {
    "are_different": "bool",
    "best_image_uid": "string",
    "caption": "string",
    "has_label": "bool",
    "image_0_uid": "string",
    "image_1_uid": "string",
    "jpg_0": "binary",
    "jpg_1": "binary",
    "label_0": "float64",
    "label_1": "float64",
    "model_0": "string",
    "model_1": "string",
    "ranking_id": "int64",
    "num_example_per_prompt": "int64",
    "__index_level_0__": "int64",
}
EXTRA_COLUMNS: dict[str, str] = {"pair_id": "string", "prompt_id": "string", "task": "string"}


def pickapic_features():
    """The ``datasets.Features`` of the export: Pick-a-Pic v2's dtypes for the columns it shares with it."""
    import datasets

    return datasets.Features({name: datasets.Value(dtype)
                              for name, dtype in {**PICKAPIC_COLUMNS, **EXTRA_COLUMNS}.items()})


def _ranking_id(pair_id: str) -> int:
    """A stable non-negative int64 per pair (Pick-a-Pic's ``ranking_id`` is an integer id of the comparison)."""
    return int.from_bytes(hashlib.sha256(pair_id.encode()).digest()[:8], "big") >> 1


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def _image_uids(meta: dict[str, Any], jpg_0: bytes, jpg_1: bytes) -> tuple[str, str]:
    """The candidate ids of the two images: from the sample's JSON (``image_0_id``/``image_1_id``, or
    ``chosen_id``/``rejected_id`` with ``chosen_is_jpg_0``), else content ids of the JPEG bytes."""
    for a, b in (("image_0_uid", "image_1_uid"), ("image_0_id", "image_1_id")):
        if meta.get(a) and meta.get(b):
            return str(meta[a]), str(meta[b])
    if meta.get("chosen_id") and meta.get("rejected_id") and isinstance(meta.get("chosen_is_jpg_0"), bool):
        chosen, rejected = str(meta["chosen_id"]), str(meta["rejected_id"])
        return (chosen, rejected) if meta["chosen_is_jpg_0"] else (rejected, chosen)
    return hashlib.sha256(jpg_0).hexdigest()[:32], hashlib.sha256(jpg_1).hexdigest()[:32]


def _models(meta: dict[str, Any]) -> tuple[str, str]:
    """Generator ids of ``jpg_0``/``jpg_1`` when the sample's JSON has them (``model_0``/``model_1``, or
    ``chosen_generator_id``/``rejected_generator_id`` with ``chosen_is_jpg_0``), else ``""``: Diffusion-DPO
    substring-tests these, so they are never null."""
    if meta.get("model_0") is not None and meta.get("model_1") is not None:
        return str(meta["model_0"]), str(meta["model_1"])
    chosen, rejected = meta.get("chosen_generator_id"), meta.get("rejected_generator_id")
    if chosen is not None and rejected is not None and isinstance(meta.get("chosen_is_jpg_0"), bool):
        return (str(chosen), str(rejected)) if meta["chosen_is_jpg_0"] else (str(rejected), str(chosen))
    return "", ""


def _prompt_key(prompt_id: Any, caption: str) -> str:
    return f"id:{prompt_id}" if prompt_id not in (None, "") else f"caption:{caption}"


def _expected_per_prompt(version_dir: str, drop_ties: bool, tasks: frozenset[str] | None,
                         storage_options: dict | None) -> dict[str, int] | None:
    """Rows per prompt the export will hold, from ``index.parquet`` (``prompt_id`` or ``caption``, ``label_0`` for
    ties, ``task``), so ``num_example_per_prompt`` is known while rows stream out; None without an index that
    says."""
    import polars as pl

    from trainers.data import read_corpus_index

    index = read_corpus_index(version_dir, storage_options=storage_options)
    if index is None:
        return None
    if "label_0" not in index.columns or not ({"prompt_id", "caption"} & set(index.columns)):
        return None
    if tasks is not None:
        if "task" not in index.columns:
            return None
        index = index.filter(pl.col("task").is_in(sorted(tasks)))
    if drop_ties:
        index = index.filter(pl.col("label_0") != 0.5)
    prompt_ids = index["prompt_id"].to_list() if "prompt_id" in index.columns else [None] * index.height
    captions = index["caption"].to_list() if "caption" in index.columns else [""] * index.height
    counts: dict[str, int] = {}
    for prompt_id, caption in zip(prompt_ids, captions):
        key = _prompt_key(prompt_id, (caption or "").strip())
        counts[key] = counts.get(key, 0) + 1
    return counts


def _pickapic_rows(version_dir: str, drop_ties: bool, tasks: frozenset[str] | None, storage_options: dict | None,
                   stats: Counter):
    """Rows (without ``num_example_per_prompt`` and ``__index_level_0__``) in corpus order."""
    from trainers.data import corpus_dataset, parse_label

    # rank/world_size explicit: a RANK in the environment must not make the export read a part of the corpus
    samples = corpus_dataset(version_dir, kind="raw", shuffle=False, rank=0, world_size=1,
                             storage_options=storage_options)
    for sample in samples:
        key = sample["__key__"]
        label_0, label_1 = parse_label(sample["label_0.txt"]), parse_label(sample["label_1.txt"])
        if abs(label_0 + label_1 - 1.0) > 1e-6 or not (0.0 <= label_0 <= 1.0):
            raise ValueError(f"sample {key}: labels {label_0}, {label_1} are not a preference (they must sum to 1)")
        tie = label_0 == label_1
        meta = json.loads(_text(sample["json"])) if "json" in sample else {}
        meta = meta if isinstance(meta, dict) else {}
        task = str(meta.get("task") or "t2i")
        if tasks is not None and task not in tasks:
            stats["other_tasks"] += 1
            continue
        stats["ties"] += tie
        if tie and drop_ties:
            stats["dropped_ties"] += 1
            continue
        stats["soft_labels"] += label_0 not in (0.0, 0.5, 1.0)
        jpg_0, jpg_1 = bytes(sample["jpg_0.jpg"]), bytes(sample["jpg_1.jpg"])
        uid_0, uid_1 = _image_uids(meta, jpg_0, jpg_1)
        model_0, model_1 = _models(meta)
        caption = _text(sample["caption.txt"]).strip()
        pair_id = str(meta.get("pair_id") or key)
        yield {
            "are_different": uid_0 != uid_1 and jpg_0 != jpg_1,
            "best_image_uid": uid_0 if label_0 > label_1 else uid_1 if label_1 > label_0 else "",
            "caption": caption,
            "has_label": True,
            "image_0_uid": uid_0,
            "image_1_uid": uid_1,
            "jpg_0": jpg_0,
            "jpg_1": jpg_1,
            "label_0": label_0,
            "label_1": label_1,
            "model_0": model_0,
            "model_1": model_1,
            "ranking_id": _ranking_id(pair_id),
            "pair_id": pair_id,
            "prompt_id": str(meta["prompt_id"]) if meta.get("prompt_id") is not None else None,
            "task": task,
        }


def _dataset_card(summary: dict[str, Any]) -> str:
    columns = ", ".join(f"`{c}`" for c in {**PICKAPIC_COLUMNS, **EXTRA_COLUMNS})
    return f"""---
configs:
- config_name: default
  data_files:
  - split: {summary['split']}
    path: data/{summary['split']}-*
---
# prefmill preference corpus, Pick-a-Pic v2 columns

Exported from corpus version `{summary['version']}` ({summary['rows']} pairs in {summary['files']} files;
mean `label_0` {summary['label_0_mean']}; ties in the corpus: {summary['ties']}, dropped: {summary['dropped_ties']};
soft labels kept: {summary['soft_labels']}; tasks: {', '.join(summary['tasks']) if summary['tasks'] else 'all'}).

Columns: {columns}. `jpg_0`/`jpg_1` are JPEG bytes; `label_0 + label_1 == 1` (`1`/`0` strict preference,
`0.5` a tie); `image_*_uid` are prefmill candidate ids; `ranking_id` is a hash of `pair_id`; `model_0`/`model_1`
are generator ids where the corpus records them, else empty. Pick-a-Pic's `created_at`, `user_id` and image URLs
are absent: the labels come from prefmill's reward models and judges, not from users.

Diffusion-DPO's `train.py` removes ties (`label_0 in (0, 1)`) only when `--dataset_name` contains `pickapic`, and
otherwise treats a tie as `jpg_0` preferred: export with `--drop-ties`, or name the directory `...pickapic...`.

```python
from datasets import load_dataset
ds = load_dataset("<this directory>")["{summary['split']}"]
```
"""


class _PartWriter:
    """Rows into ``.part-NNNNN.parquet`` files of ``rows_per_file`` rows, written a row group at a time so a file
    of large image rows is never held in memory whole."""

    def __init__(self, directory: Path, schema, rows_per_file: int):
        self.directory, self.schema, self.rows_per_file = directory, schema, rows_per_file
        self.parts: list[Path] = []
        self.rows = 0
        self._writer = None
        self._buffer: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        import pyarrow.parquet as pq

        if self.rows % self.rows_per_file == 0:
            self._close_part()
            self.parts.append(self.directory / f".part-{len(self.parts):05d}.parquet")
            self._writer = pq.ParquetWriter(self.parts[-1], self.schema)
        self._buffer.append(row)
        self.rows += 1
        if len(self._buffer) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self.schema))
            self._buffer.clear()

    def _close_part(self) -> None:
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._writer = None

    def close(self) -> list[Path]:
        import pyarrow.parquet as pq

        self._close_part()
        if not self.parts:  # an empty export still loads: one file with the schema
            self.parts.append(self.directory / ".part-00000.parquet")
            pq.write_table(self.schema.empty_table(), self.parts[-1])
        return self.parts


def export_pickapic(
    corpus_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    rows_per_file: int = ROWS_PER_FILE,
    drop_ties: bool = False,
    tasks: Iterable[str] | None = None,
    split: str = "train",
    storage_options: dict | None = None,
) -> dict[str, Any]:
    """Write the preference corpus at ``corpus_dir`` (a version directory, or a corpus root whose ``latest`` is
    used; local or an fsspec URL) to ``out_dir`` as ``data/{split}-NNNNN-of-MMMMM.parquet`` with Pick-a-Pic v2's
    columns, ``rows_per_file`` rows per file, and return a summary (rows, files, label_0 mean, ties, ...).

    ``drop_ties`` leaves out 0.5/0.5 pairs (what Diffusion-DPO trains on). ``tasks`` keeps only pairs of those
    tasks: Pick-a-Pic is text-to-image, and an ``edit`` or ``multi_ref`` pair exported without its ``src.jpg`` /
    ``ref_K.jpg`` conditioning is a caption and two images a t2i trainer would misread (``tasks=["t2i"]``); by
    default every pair is exported (``task`` says which is which). ``num_example_per_prompt`` must be
    known as rows stream out, so it comes from ``index.parquet`` (checked against the shards at the end); without
    a usable index the shards are read twice. ``out_dir`` is replaced atomically; an existing ``out_dir`` that is
    not a previous export (no ``prefmill_export.json``) is refused, not deleted.
    """
    from pipelines.io import atomic_dir
    from trainers.data import corpus_version_dir, read_corpus_manifest

    if rows_per_file < 1:
        raise ValueError("rows_per_file must be >= 1")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise FileExistsError(f"{out} exists and is not a previous export (no {MARKER}); not replacing it")
    version_dir = corpus_version_dir(corpus_dir, storage_options=storage_options)
    manifest = read_corpus_manifest(version_dir, storage_options=storage_options) or {}
    if manifest.get("corpus") not in (None, "preference_corpus"):
        raise ValueError(f"{version_dir} is a {manifest['corpus']}, not a preference corpus")
    selected = frozenset(tasks) if tasks is not None else None
    expected = _expected_per_prompt(version_dir, drop_ties, selected, storage_options)
    if expected is None:
        expected = {}
        for row in _pickapic_rows(version_dir, drop_ties, selected, storage_options, Counter()):
            key = _prompt_key(row["prompt_id"], row["caption"])
            expected[key] = expected.get(key, 0) + 1
    features = pickapic_features()
    stats: Counter = Counter()
    seen: Counter = Counter()
    label_0_sum = 0.0
    with atomic_dir(out) as tmp:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is meant to be shared
        (tmp / "data").mkdir()
        writer = _PartWriter(tmp / "data", features.arrow_schema, rows_per_file)
        for row in _pickapic_rows(version_dir, drop_ties, selected, storage_options, stats):
            key = _prompt_key(row["prompt_id"], row["caption"])
            if key not in expected:
                raise ValueError(f"pair {row['pair_id']} ({key}) is in the shards but not in index.parquet")
            seen[key] += 1
            row["num_example_per_prompt"] = expected[key]
            row["__index_level_0__"] = writer.rows
            label_0_sum += row["label_0"]
            writer.add(row)
        if dict(seen) != expected:
            differ = sorted(k for k in set(seen) | set(expected) if seen.get(k, 0) != expected.get(k, 0))[:5]
            raise ValueError(f"index.parquet and the shards disagree on pairs per prompt (e.g. {differ}): "
                             f"{sum(seen.values())} rows read, {sum(expected.values())} indexed")
        parts = writer.close()
        for i, part in enumerate(parts):
            part.rename(tmp / "data" / f"{split}-{i:05d}-of-{len(parts):05d}.parquet")
        rows = writer.rows
        summary = {
            "rows": rows,
            "files": len(parts),
            "label_0_mean": round(label_0_sum / rows, 6) if rows else None,
            "ties": stats["ties"],
            "dropped_ties": stats["dropped_ties"],
            "soft_labels": stats["soft_labels"],
            "tasks": sorted(selected) if selected is not None else None,
            "other_tasks": stats["other_tasks"],
            "split": split,
            "version": manifest.get("version") or version_dir.rstrip("/").rsplit("/", 1)[-1],
            "corpus_dir": version_dir,
            "out_dir": str(out),
            "columns": list(features),
        }
        (tmp / "README.md").write_text(_dataset_card(summary))
        (tmp / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
