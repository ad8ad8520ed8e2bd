"""Readers for the corpora the trainers consume (DESIGN.md "Data contracts"), and batch collation.

A corpus version directory holds ``shards/NNNNNN.tar`` (WebDataset), ``index.parquet`` (one row per sample) and
``manifest.json``. The shard list comes from the manifest when it names its shards, else from ``shards/*.tar``.

- SFT sample: ``jpg`` (image bytes), ``txt`` (caption), ``json`` (rewards and feedback).
- Preference sample (Pick-a-Pic layout): ``jpg_0.jpg``, ``jpg_1.jpg``, ``caption.txt``, ``label_0.txt``,
  ``label_1.txt`` (``"1"``, ``"0"`` or ``"0.5"``; ``label_0 = 1`` means ``jpg_0`` is preferred), ``json``
  (+ optional ``src.jpg`` and ``ref_K.jpg``).

Streams are deterministic: with ``shuffle_seed`` set, epoch ``e`` shuffles the shard order and a sample buffer with
seed ``shuffle_seed + e``, so ``skip=n`` reproduces exactly the stream a run that consumed ``n`` samples would see
next (that is how a resumed training run continues where it stopped). Skipped samples are not decoded.

webdataset, PIL and torch are imported inside functions.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

SHUFFLE_BUFFER = 256


# --------------------------------------------------------------------------------------------- corpus layout
def _shard_names_from_manifest(manifest: Any) -> list[str]:
    """Shard file names from whatever shape the manifest's ``shards`` entry has (list of str/dicts, or a dict)."""
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    names: list[str] = []
    if isinstance(shards, dict):
        names = [str(k) for k in shards]
    elif isinstance(shards, list):
        for item in shards:
            if isinstance(item, str):
                names.append(item)
            elif isinstance(item, dict):
                for key in ("path", "name", "file", "shard", "url"):
                    if isinstance(item.get(key), str):
                        names.append(item[key])
                        break
    return names


def corpus_shards(corpus_dir: str | os.PathLike) -> list[str]:
    """Absolute paths of the corpus' shard tars: in manifest order, else in ``index.parquet``'s ``shard`` order,
    else sorted ``shards/*.tar``."""
    root = Path(corpus_dir)
    manifest_path = root / "manifest.json"
    paths: list[str] = []
    if manifest_path.is_file():
        try:
            names = _shard_names_from_manifest(json.loads(manifest_path.read_text()))
        except ValueError:
            names = []
        for name in names:
            p = Path(name)
            cands = [p] if p.is_absolute() else [root / p, root / "shards" / p, root / "shards" / p.name]
            found = next((c for c in cands if c.is_file()), None)
            if found is None:
                raise FileNotFoundError(f"{manifest_path} lists shard {name!r}, which is missing")
            paths.append(str(found))
    if not paths and (root / "index.parquet").is_file():
        import polars as pl

        index = pl.read_parquet(root / "index.parquet")
        if "shard" in index.columns:
            names = list(dict.fromkeys(str(n) for n in index["shard"].to_list()))  # first-seen order
            for name in names:
                p = Path(name)
                cands = [p] if p.is_absolute() else [root / p, root / "shards" / p, root / "shards" / p.name]
                found = next((c for c in cands if c.is_file()), None)
                if found is not None:
                    paths.append(str(found))
    if not paths:
        paths = sorted(glob.glob(str(root / "shards" / "*.tar")))
    if not paths:
        raise FileNotFoundError(f"no shards in {root} (expected shards/*.tar or a manifest listing them)")
    return [str(Path(p).resolve()) for p in paths]


def corpus_size(corpus_dir: str | os.PathLike) -> int | None:
    """Number of samples from ``index.parquet`` (None when there is no index)."""
    index = Path(corpus_dir) / "index.parquet"
    if not index.is_file():
        return None
    import polars as pl

    return int(pl.scan_parquet(index).select(pl.len()).collect().item())


def _raw_stream(urls: list[str], shuffle_seed: int | None, repeat: bool) -> Iterator[dict[str, Any]]:
    """Undecoded samples (``__key__`` + bytes per extension), epoch after epoch when ``repeat``."""
    import webdataset as wds

    epoch = 0
    while True:
        order = list(urls)
        ds = None
        if shuffle_seed is not None:
            random.Random(shuffle_seed + epoch).shuffle(order)
            ds = wds.WebDataset(order, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)
            ds = ds.shuffle(SHUFFLE_BUFFER, seed=shuffle_seed + epoch)
        else:
            ds = wds.WebDataset(order, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)
        n = 0
        for sample in ds:
            n += 1
            yield sample
        if not repeat:
            return
        if n == 0:
            raise RuntimeError(f"corpus shards hold no samples: {urls}")
        epoch += 1


def _split(it: Iterator, rank: int, world_size: int) -> Iterator:
    """Every ``world_size``-th item starting at ``rank`` (data parallelism over a shared seeded stream)."""
    if world_size <= 1:
        yield from it
        return
    for i, item in enumerate(it):
        if i % world_size == rank:
            yield item


def _skip(it: Iterator, n: int) -> Iterator:
    for _ in range(n):
        try:
            next(it)
        except StopIteration:
            return it
    return it


def _get(sample: dict[str, Any], *names: str) -> Any:
    """First present field among ``names`` (WebDataset keys are extensions: ``jpg_0.jpg`` or ``jpg``)."""
    for name in names:
        if name in sample:
            return sample[name]
    raise KeyError(f"sample {sample.get('__key__')} has none of {names} (fields: {sorted(sample)})")


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def decode_image(data: bytes):
    """JPEG/PNG bytes -> PIL RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def parse_label(value: Any) -> float:
    """``"1"`` / ``"0"`` / ``"0.5"`` (bytes or str) -> float."""
    return float(_text(value).strip())


# --------------------------------------------------------------------------------------------- readers
def sft_samples(
    corpus_dir: str | os.PathLike,
    shuffle_seed: int | None = None,
    *,
    repeat: bool = False,
    skip: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[Any, str, dict]]:
    """Yield ``(PIL image, caption, meta)`` from an SFT corpus version directory.

    ``shuffle_seed=None`` reads in shard order; ``repeat`` loops over epochs forever; ``skip`` drops the first
    ``skip`` samples of the (seeded, global) stream without decoding them; ``rank``/``world_size`` then keep every
    ``world_size``-th sample for data-parallel processes.
    """
    it = _split(_skip(_raw_stream(corpus_shards(corpus_dir), shuffle_seed, repeat), skip), rank, world_size)
    for sample in it:
        image = decode_image(_get(sample, "jpg", "jpeg", "png", "webp"))
        caption = _text(_get(sample, "txt", "caption.txt", "caption")).strip()
        meta = json.loads(_text(sample["json"])) if "json" in sample else {}
        if isinstance(meta, dict):
            meta.setdefault("__key__", sample.get("__key__"))
        yield image, caption, meta


def preference_samples(
    corpus_dir: str | os.PathLike,
    shuffle_seed: int | None = None,
    *,
    repeat: bool = False,
    skip: int = 0,
    drop_ties: bool = False,
) -> Iterator[tuple[Any, Any, str, float, float]]:
    """Yield ``(img_0, img_1, caption, label_0, label_1)`` from a preference corpus version directory.

    ``drop_ties`` skips pairs labelled 0.5/0.5 (Diffusion-DPO trains on strict preferences). ``skip`` counts raw
    samples (ties included), so it stays consistent with a resumed stream.
    """
    it = _skip(_raw_stream(corpus_shards(corpus_dir), shuffle_seed, repeat), skip)
    for sample in it:
        pair = _decode_pair(sample, drop_ties)
        if pair is not None:
            yield pair


def _decode_pair(sample: dict[str, Any], drop_ties: bool):
    label_0 = parse_label(_get(sample, "label_0.txt", "label_0"))
    label_1 = parse_label(_get(sample, "label_1.txt", "label_1"))
    if drop_ties and label_0 == label_1:
        return None
    return (
        decode_image(_get(sample, "jpg_0.jpg", "jpg_0")),
        decode_image(_get(sample, "jpg_1.jpg", "jpg_1")),
        _text(_get(sample, "caption.txt", "caption", "txt")).strip(),
        label_0,
        label_1,
    )


def preference_stream(corpus_dir, shuffle_seed, *, start_raw: int = 0, drop_ties: bool = True, rank: int = 0,
                      world_size: int = 1):
    """Like :func:`preference_samples` (repeating) but yields ``(raw_count, pair)``: ``raw_count`` is the number of
    global raw samples consumed so far (dropped ties included), so a trainer can resume with ``start_raw``."""
    raw = _skip(_raw_stream(corpus_shards(corpus_dir), shuffle_seed, True), start_raw)
    index = start_raw
    for sample in raw:
        index += 1
        if world_size > 1 and (index - 1) % world_size != rank:
            continue
        pair = _decode_pair(sample, drop_ties)
        if pair is not None:
            yield index, pair


def batched(iterable: Iterable, n: int) -> Iterator[list]:
    """Consecutive lists of ``n`` items (the last one shorter)."""
    batch: list = []
    for item in iterable:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------- collation
def image_to_tensor(image, resolution: int):
    """PIL -> ``(3, R, R)`` float tensor in ``[-1, 1]``: resize the short side to ``R`` (bicubic), center crop."""
    import numpy as np
    import torch
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def images_to_tensor(images, resolution: int):
    """List of PIL -> ``(B, 3, R, R)`` in ``[-1, 1]``."""
    import torch

    return torch.stack([image_to_tensor(im, resolution) for im in images])


def collate_sft(batch: list[tuple[Any, str, dict]], resolution: int) -> dict[str, Any]:
    """``[(image, caption, meta)]`` -> ``{"pixels": (B,3,R,R), "captions": [...], "meta": [...]}``."""
    images, captions, metas = zip(*batch)
    return {"pixels": images_to_tensor(images, resolution), "captions": list(captions), "meta": list(metas)}


def collate_preference(batch: list[tuple[Any, Any, str, float, float]], resolution: int) -> dict[str, Any]:
    """Pairs -> preferred/dispreferred tensors.

    ``pixels_w`` is ``img_0`` where ``label_0 > label_1`` else ``img_1`` (ties keep ``img_0`` as ``w``; use
    ``drop_ties`` upstream to exclude them); ``label_w`` holds the winner's label (1, or 0.5 for a tie).
    """
    import torch

    w_imgs, l_imgs, captions, label_w = [], [], [], []
    for img_0, img_1, caption, label_0, label_1 in batch:
        if label_1 > label_0:
            w_imgs.append(img_1)
            l_imgs.append(img_0)
            label_w.append(label_1)
        else:
            w_imgs.append(img_0)
            l_imgs.append(img_1)
            label_w.append(label_0)
        captions.append(caption)
    return {
        "pixels_w": images_to_tensor(w_imgs, resolution),
        "pixels_l": images_to_tensor(l_imgs, resolution),
        "captions": captions,
        "label_w": torch.tensor(label_w, dtype=torch.float32),
    }


# --------------------------------------------------------------------------------------------- prompt pool
def load_prompt_pool(path: str | os.PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """Rows of the RL prompt pool parquet (``prompt_id, task, text, reference_images, reference_types, split,
    difficulty``) as dicts, optionally only one ``split``; sorted by ``prompt_id`` for a stable order."""
    import polars as pl

    df = pl.read_parquet(path)
    if split is not None and "split" in df.columns:
        df = df.filter(pl.col("split") == split)
    rows = df.sort("prompt_id").to_dicts() if "prompt_id" in df.columns else df.to_dicts()
    for row in rows:
        row["reference_images"] = list(row.get("reference_images") or [])
        row["reference_types"] = list(row.get("reference_types") or [])
        row.setdefault("task", "t2i")
    return rows
