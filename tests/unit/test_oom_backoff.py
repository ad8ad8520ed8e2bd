"""Out-of-memory backoff: a batch that does not fit is retried in halves; other errors are not swallowed."""

import pytest
import torch

from labelers.oom import is_out_of_memory, map_batches_with_oom_backoff


class FakeDevice:
    """Processes at most ``capacity`` items per call, like a GPU with limited memory."""

    def __init__(self, capacity, error=torch.cuda.OutOfMemoryError):
        self.capacity = capacity
        self.error = error
        self.calls = []

    def __call__(self, batch):
        self.calls.append(len(batch))
        if len(batch) > self.capacity:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in batch]


def test_halves_until_it_fits_and_keeps_the_smaller_size():
    device, shrinks = FakeDevice(capacity=3), []
    out, size = map_batches_with_oom_backoff(list(range(10)), 8, device, on_shrink=lambda a, b: shrinks.append((a, b)))
    assert out == [x * 10 for x in range(10)] and size == 2
    assert shrinks == [(8, 4), (4, 2)] and device.calls == [8, 4, 2, 2, 2, 2, 2]


def test_recognises_oom_by_type_and_message_and_reraises_everything_else():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not a runtime/memory error
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    with pytest.raises(ValueError, match="bad row"):
        map_batches_with_oom_backoff([1, 2], 2, lambda b: (_ for _ in ()).throw(ValueError("bad row")))
    with pytest.raises(torch.cuda.OutOfMemoryError):  # does not fit even one at a time
        map_batches_with_oom_backoff([1, 2], 2, FakeDevice(capacity=0))
    with pytest.raises(ValueError, match="2 results for 1"):
        map_batches_with_oom_backoff([1], 1, lambda b: [1, 2])


def test_generator_continues_with_a_smaller_batch_after_oom(monkeypatch):
    from pipelines.generation import GenerationRequest, ImageGenerator

    gen = ImageGenerator("zoo:t2i", kind="t2i", steps=1, batch_size=4, width=32, height=32)
    seen = []

    def fake_batch(batch):
        seen.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return [f"img-{r.key}" for r in batch]

    monkeypatch.setattr(gen, "setup", lambda: gen)
    monkeypatch.setattr(gen, "_generate_batch", fake_batch)
    requests = [GenerationRequest(key=f"k{i}", text="x", seed=i) for i in range(5)]
    assert gen.generate(requests) == [f"img-k{i}" for i in range(5)]
    assert gen.batch_size == 2 and seen == [4, 2, 2, 2]
