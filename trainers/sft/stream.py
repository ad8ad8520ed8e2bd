"""The SFT trainer's data stream: :func:`trainers.data.corpus_dataset` through a ``DataLoader``, exactly resumable.

Each data-parallel rank reads only its own shards (``corpus_dataset``'s node split), and DataLoader workers read,
decode and collate them into chunks of ``chunk_size`` ``(pixels, captions, meta)`` while the training step runs.

Order. In epoch ``e`` worker ``w`` of a rank reads its shards (``corpus_dataset(epoch=e)``: shard order and sample
buffer seeded by ``(seed, e)``, node and worker) and cuts them into chunks ``k = 0, 1, ...`` of ``chunk_size`` (the
last one shorter). The rank's stream is, epoch after epoch, the chunks in the order ``(k, w)``: chunk 0 of every
worker, then chunk 1 of every worker, ... (a worker that has run out is passed over), so every epoch holds each of
the rank's samples exactly once. That is the order in which a DataLoader delivers its workers' items, so the
training process keeps at most about one item per worker until its turn, and the order never depends on timing.
A worker that finishes its epoch early waits for the others (it sends empty "idle" items, which are dropped) until
the training process opens the next epoch (a shared counter): no worker runs ahead, memory stays bounded.

Resume. :attr:`SFTStream.position` ``{"epoch", "chunk", "worker", "offset"}`` (the chunk being read and how many of
its samples were consumed) is what a checkpoint stores. A stream built at that position has every worker skip
exactly what the uninterrupted stream had consumed from it (without decoding: ``corpus_dataset(decode=False)``),
so it continues with the same samples in the same order. The order depends on ``num_workers`` and
``chunk_size`` (and on the rank count): a run resumes with the same ones.

Transport. Workers ship pixels as uint8 (``image_to_tensor``'s values, a quarter of float32's bytes); with workers,
a thread of the training process takes their items off the DataLoader and turns the pixels back into exactly
``image_to_tensor``'s floats while the step runs (as the DataLoader's pin-memory thread does on GPUs), so a step
only waits for data the workers have not produced yet.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset

START = {"epoch": 0, "chunk": 0, "worker": 0, "offset": 0}
IDLE_WAIT = 0.005  # seconds a worker waiting for the next epoch to open waits before answering "idle"


def _identity(item: Any) -> Any:
    return item


class _Chunks(IterableDataset):
    """``IterableDataset`` run by each DataLoader worker: the worker's samples of epoch after epoch, decoded and
    collated into chunks ``{"epoch", "chunk", "worker", "pixels", "captions", "meta"}``; after each epoch
    ``{"epoch", "worker", "end": number of chunks the epoch has}`` (skipped ones included), then ``{"idle"}`` items
    until ``open_epoch`` (shared with the training process) lets the next epoch start."""

    def __init__(self, dataset, *, chunk_size: int, resolution: int, start: dict[str, int], open_epoch,
                 tasks: frozenset[str] | None = None):
        super().__init__()
        self.dataset = dataset  # corpus_dataset(kind="sft", decode=False)
        self.tasks = tasks  # samples of other tasks are skipped (before counting: positions count kept samples)
        self.chunk_size = int(chunk_size)
        self.resolution = int(resolution)
        self.start = dict(start)
        self.open_epoch = open_epoch  # multiprocessing.RawValue("q"): the highest epoch workers may read

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker = info.id if info is not None else 0
        e0, k0, w0, j0 = (int(self.start[k]) for k in ("epoch", "chunk", "worker", "offset"))
        size = self.chunk_size
        for epoch in itertools.count(e0):
            while self.open_epoch.value < epoch:
                # wait a little for the epoch to open before answering "idle" (the DataLoader needs an answer: it
                # hands items out in order, so a silent worker would hold up the others), so a waiting worker costs
                # at most ~1/IDLE_WAIT tiny items a second
                deadline = time.monotonic() + IDLE_WAIT
                while self.open_epoch.value < epoch and time.monotonic() < deadline:
                    time.sleep(IDLE_WAIT / 10)
                if self.open_epoch.value < epoch:
                    yield {"worker": worker, "idle": True}
            self.dataset.set_epoch(epoch)
            skip, forced = 0, None
            if epoch == e0:
                # the uninterrupted stream had consumed chunks < k0 of every worker, chunk k0 of workers < w0 and
                # the first j0 samples of chunk (k0, w0)
                skip = (k0 + 1) * size if worker < w0 else k0 * size + (j0 if worker == w0 else 0)
                forced = k0 if worker == w0 else None  # sent even when nothing of it is left (main waits for it)
            seen = 0
            buf: list = []
            for image_bytes, caption, meta in self.dataset:
                if self.tasks is not None and str(meta.get("task") or "t2i") not in self.tasks:
                    continue
                index = seen
                seen += 1
                if index < skip:
                    continue
                buf.append((image_bytes, caption, meta))
                if seen % size == 0:
                    k = index // size
                    if forced is not None and forced < k:
                        yield self._chunk(epoch, forced, worker, [])
                    forced = None
                    yield self._chunk(epoch, k, worker, buf)
                    buf = []
            n_chunks = -(-seen // size)
            if buf:
                k = (seen - 1) // size
                if forced is not None and forced < k:
                    yield self._chunk(epoch, forced, worker, [])
                forced = None
                yield self._chunk(epoch, k, worker, buf)
            if forced is not None and forced < n_chunks:
                yield self._chunk(epoch, forced, worker, [])
            yield {"epoch": epoch, "worker": worker, "end": n_chunks}

    def _chunk(self, epoch: int, k: int, worker: int, items: list) -> dict[str, Any]:
        import torch

        from trainers.data import decode_image, image_to_tensor

        r = self.resolution
        pixels = torch.empty((len(items), 3, r, r), dtype=torch.uint8)
        for i, (data, _, _) in enumerate(items):
            # image_to_tensor's crop and values, shipped as the uint8 they came from (a quarter of the bytes of
            # float32); _pixels turns them back into exactly image_to_tensor's floats
            pixels[i] = ((image_to_tensor(decode_image(data), r) + 1.0) * 127.5).round_().clamp_(0, 255).byte()
        return {"epoch": epoch, "chunk": k, "worker": worker, "pixels": pixels,
                "captions": [c for _, c, _ in items], "meta": [m for _, _, m in items]}


def _pixels(chunk: dict[str, Any]):
    """The chunk's pixels as ``(n, 3, R, R)`` float in ``[-1, 1]``, converted once: ``u / 127.5 - 1`` in float32,
    the very values :func:`trainers.data.image_to_tensor` computes."""
    import torch

    pixels = chunk["pixels"]
    if pixels.dtype == torch.uint8:
        pixels = chunk["pixels"] = pixels.float().div_(127.5).sub_(1.0)
    return pixels


class _Receiver:
    """A thread that takes the DataLoader's items (off the worker pipe, pixels converted to float, idle items
    dropped) into a local queue while the training step runs -- what the DataLoader's pin-memory thread does on
    GPUs -- so a step only waits for data the workers have not produced yet. The DataLoader iterator is only
    touched by this thread until it stops; an error (a worker died, a corrupt shard) is raised in the training
    thread by :meth:`get`."""

    def __init__(self, items: Iterator, ahead: int):
        import queue
        import threading

        self._items = items
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sft-stream-receiver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import queue

        try:
            for item in self._items:
                if self._stopping.is_set():
                    return
                if "idle" in item:
                    continue
                if "pixels" in item:
                    _pixels(item)
                while not self._stopping.is_set():
                    try:
                        self._queue.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stopping.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread
            self._queue.put((None, exc))
            return
        self._queue.put((None, StopIteration()))

    def get(self) -> Any:
        import queue

        while True:
            try:
                item, error = self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the data stream's receiving thread ended without a word") from None
                continue
            if error is not None:
                raise error
            return item

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the thread to stop and wait for it (a thread stuck in the DataLoader is left to die with it)."""
        import queue
        import time

        self._stopping.set()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:  # unblock a put
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)


class SFTStream:
    """Batches ``{"pixels": (B,3,R,R), "captions": [...], "meta": [...]}`` of one rank, forever (epoch after
    epoch), from ``num_workers`` DataLoader workers (0: read in this process). See the module docstring."""

    def __init__(self, corpus_dir: str | os.PathLike, *, resolution: int, chunk_size: int, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 256, rank: int = 0, world_size: int = 1,
                 num_workers: int = 1, prefetch_factor: int | None = 2, position: dict[str, int] | None = None,
                 storage_options: dict | None = None, tasks: list[str] | None = None):
        import multiprocessing

        import torch
        from torch.utils.data import DataLoader

        from trainers.data import corpus_dataset

        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        start = {**START, **(position or {})}
        self.num_workers = int(num_workers)
        self.slots = max(1, self.num_workers)  # worker ids 0..slots-1 (0 alone when reading in this process)
        if set(start) != set(START) or not 0 <= int(start["worker"]) < self.slots:
            raise ValueError(f"stream position {position} does not fit {self.slots} DataLoader worker slot(s): a "
                             "run resumes with the dataloader_num_workers it was started with")
        dataset = corpus_dataset(corpus_dir, kind="sft", decode=False, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                                 seed=seed, rank=rank, world_size=world_size, storage_options=storage_options)
        self.shards = list(dataset.shards)
        self._open_epoch = multiprocessing.RawValue("q", int(start["epoch"]))  # inherited by the workers
        self.chunks = _Chunks(dataset, chunk_size=chunk_size, resolution=resolution, start=start,
                              open_epoch=self._open_epoch, tasks=frozenset(tasks) if tasks else None)
        extra: dict[str, Any] = {}
        if self.num_workers > 0:
            extra = {"prefetch_factor": prefetch_factor, "persistent_workers": False}
        self.loader = DataLoader(self.chunks, batch_size=None, collate_fn=_identity, num_workers=self.num_workers,
                                 generator=torch.Generator().manual_seed(int(seed)), **extra)
        self._items: Iterator | None = None
        self._receiver: _Receiver | None = None
        self.receive_ahead = max(1, int(prefetch_factor or 2))
        self._pending: dict[tuple[int, int, int], dict] = {}  # (epoch, chunk, worker) -> chunk, arrived early
        self._ends: dict[tuple[int, int], int] = {}  # (epoch, worker) -> chunks the worker has in that epoch
        self._epoch, self._k, self._w = int(start["epoch"]), int(start["chunk"]), int(start["worker"])
        self._current: dict | None = None  # the chunk being read
        self._offset = int(start["offset"])  # samples of the current chunk consumed (counting from its start)
        self._base = self._offset  # chunk offset of self._current's first sample

    # ------------------------------------------------------------------------------------------ position
    @property
    def position(self) -> dict[str, int]:
        """Where the stream is: ``{"epoch", "chunk", "worker", "offset"}`` (JSON-able; a checkpoint stores it)."""
        return {"epoch": self._epoch, "chunk": self._k, "worker": self._w, "offset": self._offset}

    # ------------------------------------------------------------------------------------------ reading
    def _pull(self) -> None:
        if self._items is None:
            self._items = iter(self.loader)
            if self.num_workers > 0 and self.receive_ahead > 0:
                self._receiver = _Receiver(self._items, self.receive_ahead)
        item = self._receiver.get() if self._receiver is not None else next(self._items)
        if "idle" in item:
            return
        if "end" in item:
            self._ends[(item["epoch"], item["worker"])] = int(item["end"])
        else:
            self._pending[(item["epoch"], item["chunk"], item["worker"])] = item

    def _step(self) -> None:
        """Move the pointer to the next ``(k, w)`` of the canonical order."""
        self._w += 1
        if self._w == self.slots:
            self._w = 0
            self._k += 1
        self._offset = self._base = 0

    def _next_chunk(self) -> dict:
        """The chunk at the pointer, passing over workers without such a chunk and on to the next epoch once every
        worker's chunks are done."""
        while True:
            key = (self._epoch, self._k, self._w)
            if key in self._pending:
                return self._pending.pop(key)
            ends = [self._ends.get((self._epoch, w)) for w in range(self.slots)]
            if None not in ends and self._k >= max(ends):  # every worker has ended, none has chunk k: epoch over
                if max(ends) == 0:
                    raise RuntimeError(f"the corpus shards of this rank hold no samples: {self.shards}")
                for w in range(self.slots):
                    del self._ends[(self._epoch, w)]
                self._epoch, self._k, self._w = self._epoch + 1, 0, 0
                self._offset = self._base = 0
                self._open_epoch.value = self._epoch  # the workers waiting at the epoch's end go on
                continue
            end = ends[self._w]
            if end is not None and self._k >= end:
                self._step()
                continue
            self._pull()

    def take(self, n: int) -> dict[str, Any]:
        """The next ``n`` samples as ``{"pixels": (n,3,R,R), "captions", "meta"}``."""
        import torch

        pixels, captions, metas = [], [], []
        need = n
        while need > 0:
            if self._current is None:
                self._current = self._next_chunk()
                self._base = self._offset  # a resumed partial chunk starts at the stored offset
            cur = self._current
            start = self._offset - self._base
            avail = len(cur["captions"]) - start
            if avail <= 0:
                self._current = None
                self._step()
                continue
            m = min(need, avail)
            pixels.append(_pixels(cur)[start:start + m])
            captions += cur["captions"][start:start + m]
            metas += cur["meta"][start:start + m]
            self._offset += m
            need -= m
        return {"pixels": pixels[0] if len(pixels) == 1 else torch.cat(pixels), "captions": captions, "meta": metas}

    def keys(self, n: int) -> list[str]:
        """The ``__key__`` of the next ``n`` samples (tests)."""
        return [m.get("__key__") for m in self.take(n)["meta"]]

    def close(self) -> None:
        """Stop the receiving thread and the DataLoader workers."""
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            receiver.stop()
        items, self._items = self._items, None
        shutdown = getattr(items, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
        del items

    def __enter__(self) -> SFTStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
