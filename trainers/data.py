"""Readers for the corpora the trainers consume (DESIGN.md "Data contracts"), and batch collation.

A corpus version directory (a local path or an fsspec URL such as ``s3://bucket/corpora/preference_corpus/<v>``)
is read as :mod:`pipelines.corpus_format` defines it (the one definition the writer uses too): the shards are the
manifest's, in its order, resolved against the version directory (a refreshed version references shards in an
older one, ``../<older>/shards/000002.tar``); a directory without ``manifest.json`` is not a committed version
and is refused. :func:`corpus_version_dir` turns a corpus root into the version its ``latest`` names.

- SFT sample: ``jpg`` (image bytes), ``txt`` (caption), ``json`` (rewards and feedback).
- Preference sample (Pick-a-Pic layout): ``jpg_0.jpg``, ``jpg_1.jpg``, ``caption.txt``, ``label_0.txt``,
  ``label_1.txt`` (``"1"``, ``"0"`` or ``"0.5"``; ``label_0 = 1`` means ``jpg_0`` is preferred), ``json``
  (+ optional ``src.jpg`` and ``ref_K.jpg``).

Two ways to read a corpus:

- The generator readers (:func:`sft_samples`, :func:`preference_samples`, :func:`preference_stream`) the in-process
  trainers use. They are deterministic: with ``shuffle_seed`` set, epoch ``e`` shuffles the shard order and a
  sample buffer with seed ``shuffle_seed + e``, so ``skip=n`` reproduces exactly the stream a run that consumed
  ``n`` samples would see next (that is how a resumed training run continues where it stopped). Skipped samples
  are not decoded. Data parallelism there keeps every ``world_size``-th sample of one shared stream (every rank
  reads every shard).
- :func:`corpus_dataset`, a webdataset pipeline (an ``IterableDataset``) for ``torch.utils.data.DataLoader`` with
  worker processes and for multi-node runs: shards are split across nodes and DataLoader workers (each shard is
  read by exactly one worker), or resampled with replacement for runs whose ranks hold uneven shard counts.

Both open shards through the same stage: local files with ``open``, URLs through fsspec (``memory://``, ``s3://``,
``gs://``, ...), so a corpus on object storage reads like a local one.

webdataset, fsspec, polars, PIL and torch are imported inside functions.

One module over ~500 lines: the generator readers and the DataLoader pipeline are two front ends over the same
shard stages and sample decoding, and both hand their samples to the collate functions kept beside them.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import random
import sys
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from pipelines.corpus_format import (  # noqa: F401 - corpus_version_dir: the readers' entry point
    INDEX,
    MANIFEST,
    corpus_version_dir,
    is_url,
    join,
    location,
    open_file,
    read_bytes,
    read_manifest,
    shard_url,
)

SHUFFLE_BUFFER = 256
KINDS = ("preference", "sft", "raw")


# --------------------------------------------------------------------------------------------- corpus layout
def _existing_urls(urls: list[str], storage_options: dict | None) -> set[str]:
    """The subset of ``urls`` that exist, with one listing per parent directory rather than one request per file
    (a corpus on S3 can have thousands of shards in a few directories)."""
    import fsspec

    by_parent: dict[tuple[int, str], tuple[Any, list[tuple[str, str]]]] = {}
    for url in urls:
        fs, stripped = fsspec.core.url_to_fs(url, **(storage_options or {}))
        parent = posixpath.dirname(stripped.rstrip("/"))
        by_parent.setdefault((id(fs), parent), (fs, []))[1].append((url, stripped))
    found: set[str] = set()
    for (_, parent), (fs, members) in by_parent.items():
        try:  # refresh: a listing cached earlier in this process may predate the version being read
            listing = {p.rstrip("/") for p in fs.ls(parent, detail=False, refresh=True)}
        except (FileNotFoundError, NotADirectoryError):
            continue
        found.update(url for url, stripped in members if stripped.rstrip("/") in listing)
    return found


def corpus_shards(corpus_dir: str | os.PathLike, *, storage_options: dict | None = None) -> list[str]:
    """The version's shard tars in manifest order: absolute local paths, or URLs when ``corpus_dir`` is a URL.

    A version without ``manifest.json`` (not committed), a manifest naming no shard, or a shard the manifest names
    that is missing raises ``FileNotFoundError`` here, before any training starts."""
    root = location(corpus_dir)
    return _resolve_shards(root, read_manifest(root, storage_options=storage_options), storage_options)


def _resolve_shards(root: str, manifest: dict[str, Any], storage_options: dict | None) -> list[str]:
    urls = [shard_url(root, shard) for shard in manifest["shards"]]
    if not urls:
        raise FileNotFoundError(f"no shards in {root}: its {MANIFEST} lists none")
    exists = _existing_urls(urls, storage_options).__contains__ if is_url(root) else os.path.isfile
    missing = next((url for url in urls if not exists(url)), None)
    if missing is not None:
        raise FileNotFoundError(f"{join(root, MANIFEST)} lists shard {missing!r}, which is missing")
    return urls


def corpus_size(corpus_dir: str | os.PathLike, *, storage_options: dict | None = None) -> int | None:
    """Number of samples from ``index.parquet`` (None when there is no index)."""
    root = location(corpus_dir)
    if not is_url(root):
        index = Path(root) / INDEX
        if not index.is_file():
            return None
        import polars as pl

        return int(pl.scan_parquet(index).select(pl.len()).collect().item())
    data = read_bytes(join(root, INDEX), storage_options)
    if data is None:
        return None
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(io.BytesIO(data)).metadata.num_rows)


# --------------------------------------------------------------------------------------------- shard reading stages
def _open_shards(src: Iterable[dict[str, Any]], storage_options: dict | None = None) -> Iterator[dict[str, Any]]:
    """webdataset stage: ``{"url"}`` -> ``{"url", "stream"}``, local files with ``open`` and URLs through fsspec.

    Replaces webdataset's own opener (``gopen``), which knows local files, ``pipe:`` and a few CLI-backed
    schemes but not fsspec's (``memory://``, ``s3://`` with credentials from ``storage_options``). Each stream is
    closed once the tar expander has moved on to the next shard (or the stream is abandoned)."""
    for item in src:
        url = item["url"]
        handle = open_file(url, storage_options)
        try:
            out = {**item, "stream": handle}
            if not is_url(url):
                out["local_path"] = url
            yield out
        finally:
            handle.close()


def _sample_stages(storage_options: dict | None = None) -> list:
    """The stages that turn ``{"url"}`` items into raw samples (``__key__`` + bytes per member name)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    return [
        partial(_open_shards, storage_options=storage_options),
        tar_file_expander,
        group_by_keys,
    ]


def _raw_stream(urls: list[str], shuffle_seed: int | None, repeat: bool) -> Iterator[dict[str, Any]]:
    """Undecoded samples (``__key__`` + bytes per extension), epoch after epoch when ``repeat``.

    The stages are those of ``wds.WebDataset(order, shardshuffle=False).shuffle(SHUFFLE_BUFFER, seed=...)`` (which
    this used before), so seeded streams, and therefore resumed runs, see the same order as before."""
    import webdataset as wds

    epoch = 0
    while True:
        order = list(urls)
        shuffle = []
        if shuffle_seed is not None:
            random.Random(shuffle_seed + epoch).shuffle(order)
            shuffle = [wds.shuffle(SHUFFLE_BUFFER, seed=shuffle_seed + epoch)]
        ds = wds.DataPipeline(wds.SimpleShardList(order), *_sample_stages(), *shuffle)
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


def condition_members(sample: dict[str, Any]) -> dict[str, Any]:
    """The images an edit / multi_ref sample conditions on, as encoded bytes: ``{"_src": bytes | None,
    "_refs": [bytes, ...]}`` (``src.jpg`` and ``ref_K.jpg`` in K order); decode with :func:`condition_images`."""
    src = next((sample[k] for k in ("src.jpg", "src") if k in sample), None)
    refs = []
    for key in sample:
        name = str(key)
        if name.startswith("ref_") and name.split(".")[0][4:].isdigit():
            refs.append((int(name.split(".")[0][4:]), bytes(sample[key])))
    return {"_src": bytes(src) if src is not None else None, "_refs": [b for _, b in sorted(refs)]}


def condition_images(meta: dict[str, Any]) -> tuple[Any, list]:
    """``(source PIL or None, [reference PIL, ...])`` from a sample meta filled by :func:`condition_members`."""
    src = meta.get("_src")
    return (decode_image(src) if src else None), [decode_image(b) for b in meta.get("_refs") or []]


def _sft_tuple(sample: dict[str, Any], decode: bool = True) -> tuple[Any, str, dict]:
    """``(image, caption, meta)``; the image stays bytes when not ``decode``. ``meta`` (the sample's json) also
    carries the conditioning images' bytes (``_src``, ``_refs``) of edit / multi_ref samples."""
    data = _get(sample, "jpg", "jpeg", "png", "webp")
    caption = _text(_get(sample, "txt", "caption.txt", "caption")).strip()
    meta = json.loads(_text(sample["json"])) if "json" in sample else {}
    if isinstance(meta, dict):
        meta.setdefault("__key__", sample.get("__key__"))
        meta.update(condition_members(sample))
    return (decode_image(data) if decode else bytes(data)), caption, meta


def _pair_tuple(sample: dict[str, Any], drop_ties: bool, decode: bool = True):
    """``(img_0, img_1, caption, label_0, label_1, meta)``, or None for a tie when ``drop_ties``; images stay bytes
    when not ``decode``. ``meta``: the pair's json (``task``, ...) plus its conditioning images' bytes (``_src``,
    ``_refs``)."""
    label_0 = parse_label(_get(sample, "label_0.txt", "label_0"))
    label_1 = parse_label(_get(sample, "label_1.txt", "label_1"))
    if drop_ties and label_0 == label_1:
        return None
    img_0, img_1 = _get(sample, "jpg_0.jpg", "jpg_0"), _get(sample, "jpg_1.jpg", "jpg_1")
    meta = json.loads(_text(sample["json"])) if "json" in sample else {}
    meta = meta if isinstance(meta, dict) else {}
    meta.setdefault("__key__", sample.get("__key__"))
    meta.update(condition_members(sample))
    return (
        decode_image(img_0) if decode else bytes(img_0),
        decode_image(img_1) if decode else bytes(img_1),
        _text(_get(sample, "caption.txt", "caption", "txt")).strip(),
        label_0,
        label_1,
        meta,
    )


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
        yield _sft_tuple(sample)


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
    return _pair_tuple(sample, drop_ties, decode=True)


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


# --------------------------------------------------------------------------------------------- DataLoader reader
def _mix_seed(*parts: int) -> int:
    """A 31-bit seed from ints. (webdataset's ``make_seed`` does the same through ``hash``; ints only here, so the
    seed is the same in every process whatever ``PYTHONHASHSEED`` is.)"""
    seed = 0
    for part in parts:
        seed = (seed * 31 + int(part)) & 0x7FFFFFFF
    return seed


def node_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this node: as given, else from ``torch.distributed`` when it is initialised, else
    from the ``RANK``/``WORLD_SIZE`` environment variables (torchrun, accelerate), else ``(0, 1)``."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("give both rank and world_size, or neither")
    else:
        torch = sys.modules.get("torch")  # not imported yet -> torch.distributed cannot be initialised
        dist = getattr(torch, "distributed", None) if torch is not None else None
        if dist is not None and dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        else:
            rank, world_size = 0, 1
    rank, world_size = int(rank), int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


def _dataloader_worker() -> int:
    """This DataLoader worker's id (0 outside workers), as ``wds.split_by_worker`` sees it."""
    from webdataset.utils import pytorch_worker_info

    return pytorch_worker_info()[2]


def _split_by_node(src: Iterator, rank: int, world_size: int) -> Iterator:
    """Shards ``rank``, ``rank + world_size``, ... (``wds.split_by_node`` reads rank and world size from the
    environment or torch.distributed; here they are explicit so a caller can pass them)."""
    from itertools import islice

    return islice(src, rank, None, world_size) if world_size > 1 else src


def _resample_worker_seed(rank: int) -> int:
    """A distinct seed per node and DataLoader worker for ``wds.ResampledShards``."""
    return rank * 1000 + _dataloader_worker()


class _ShardSource:
    """First stage of :func:`corpus_dataset`'s pipeline: the ``{"url"}`` items this node and DataLoader worker
    reads, for the current epoch.

    Not resampled: webdataset's ``SimpleShardList`` shuffles the whole shard list with a seed made from
    ``(seed, epoch)`` -- the same permutation on every node and worker, which is what makes the node split and
    then ``wds.split_by_worker`` a partition: each shard is read by exactly one worker of one node per epoch.
    Resampled: ``wds.ResampledShards`` draws shards with replacement, forever, from a seed made from
    ``(seed, epoch)`` and the node and worker, so every worker has an endless stream of its own and ranks never
    run dry at different times (what multi-node training with uneven shard counts needs).

    It is a plain object (not a closure) so the pipeline pickles for DataLoader workers started with ``spawn`` or
    ``forkserver``; :meth:`set_epoch` changes the seeds the next iteration uses.
    """

    def __init__(self, urls: list[str], *, shuffle: bool, seed: int, epoch: int, resampled: bool, rank: int,
                 world_size: int):
        self.urls = list(urls)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.resampled = resampled
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        if self.resampled:
            shards = wds.ResampledShards(self.urls, seed=_mix_seed(self.seed, self.epoch), deterministic=True,
                                         worker_seed=partial(_resample_worker_seed, self.rank))
            return iter(shards)
        shards = wds.SimpleShardList(self.urls, seed=_mix_seed(self.seed, self.epoch) if self.shuffle else None)
        return wds.split_by_worker(_split_by_node(iter(shards), self.rank, self.world_size))


class _BufferShuffle:
    """Sample shuffle in a buffer of ``bufsize`` (webdataset's ``shuffle`` stage), seeded per epoch, node and
    worker: reproducible, and different workers do not shuffle in lockstep."""

    def __init__(self, source: _ShardSource, bufsize: int):
        self.source = source
        self.bufsize = int(bufsize)

    def __call__(self, src: Iterator) -> Iterator:
        import webdataset as wds

        s = self.source
        rng = random.Random(_mix_seed(s.seed, s.epoch, s.rank, _dataloader_worker(), 1))
        return wds.shuffle(self.bufsize, initial=min(100, self.bufsize), rng=rng)(src)


def _decode_sample(sample: dict[str, Any], kind: str, decode: bool, drop_ties: bool):
    if kind == "preference":
        return _pair_tuple(sample, drop_ties, decode)  # None (dropped by wds.map) for a tie when drop_ties
    return _sft_tuple(sample, decode)


def corpus_dataset(
    corpus_dir: str | os.PathLike,
    *,
    kind: str = "preference",
    shuffle: bool = True,
    shuffle_buffer: int = SHUFFLE_BUFFER,
    seed: int = 0,
    resampled: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    epoch: int = 0,
    decode: bool = True,
    drop_ties: bool = False,
    storage_options: dict | None = None,
):
    """A webdataset pipeline over a corpus version, for ``torch.utils.data.DataLoader(num_workers>=0)``.

    Yields what the generator readers yield, so the existing collate functions batch it
    (``DataLoader(ds, batch_size=B, collate_fn=partial(collate_preference, resolution=R), num_workers=4)``):

    - ``kind="preference"``: ``(img_0, img_1, caption, label_0, label_1)``; ``drop_ties`` skips 0.5/0.5 pairs;
    - ``kind="sft"``: ``(image, caption, meta)``;
    - ``kind="raw"``: the undecoded sample dicts (``__key__``, ``__url__``, bytes per member name).

    ``decode=False`` leaves images as their encoded bytes (cheap to move between processes; decode later).

    Splitting: the shard list (from the manifest, see :func:`corpus_shards`) goes to nodes by ``rank`` /
    ``world_size`` (default :func:`node_rank_world`), then to DataLoader workers (``wds.split_by_worker``), so a
    shard is read by one worker of one node. Not resampled, an epoch reads each sample exactly once over all
    nodes and workers, and nodes get ``len(shards) // world_size`` or one more shards -- fine for evaluation or
    when shards outnumber ranks many times; ``world_size`` above the shard count is an error. ``resampled=True``
    draws shards with replacement forever (seeded per node and worker), for data-parallel training where every
    rank must keep producing batches; bound it with ``.with_epoch(n)`` or by counting steps.

    Shuffling (``shuffle=True``): the shard order with a seed made from ``(seed, epoch)``, then samples in a buffer
    of ``shuffle_buffer``. ``shuffle=False`` reads shards in manifest order and samples in tar order (with one
    worker and one node: the corpus order, which is what a deterministic export needs). Call
    ``ds.set_epoch(e)`` before each epoch (like ``DistributedSampler.set_epoch``) or build the dataset with
    ``epoch=e``; iterating twice without it repeats the same order. (DataLoader workers get a copy of the dataset
    when an iteration starts: with ``persistent_workers=True`` they keep the epoch they started with.)

    ``storage_options`` go to fsspec for URL corpora (e.g. ``{"client_kwargs": {"endpoint_url": ...}}`` for an
    S3-compatible store). The returned pipeline (a ``wds.FluidWrapper``: ``.batched``, ``.with_epoch``, ... work)
    carries ``shards``, ``num_samples`` (from the manifest, when it says), ``rank``, ``world_size`` and
    ``set_epoch``.
    """
    import webdataset as wds

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {KINDS}")
    root = location(corpus_dir)
    manifest = read_manifest(root, storage_options=storage_options)
    urls = _resolve_shards(root, manifest, storage_options)
    rank, world_size = node_rank_world(rank, world_size)
    if not resampled and len(urls) < world_size:
        raise ValueError(f"{len(urls)} shards cannot be split over {world_size} nodes (some would read nothing); "
                         f"use resampled=True or write smaller shards")
    source = _ShardSource(urls, shuffle=shuffle, seed=seed, epoch=epoch, resampled=resampled, rank=rank,
                          world_size=world_size)
    ds = wds.FluidWrapper(source)
    for stage in _sample_stages(storage_options):
        ds.append(stage)
    if shuffle and shuffle_buffer > 1:
        ds.append(_BufferShuffle(source, shuffle_buffer))
    if kind != "raw":
        ds.append(wds.map(partial(_decode_sample, kind=kind, decode=decode, drop_ties=drop_ties)))
    ds.shards = urls
    ds.num_samples = manifest.get("num_samples")
    ds.rank, ds.world_size = rank, world_size
    ds.set_epoch = source.set_epoch
    return ds


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

    w_imgs, l_imgs, captions, label_w, metas = [], [], [], [], []
    for img_0, img_1, caption, label_0, label_1, *rest in batch:
        metas.append(rest[0] if rest else {})
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
        "meta": metas,
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
