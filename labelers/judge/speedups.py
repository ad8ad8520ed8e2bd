"""What keeps :class:`~labelers.judge.transformers_backend.TransformersJudge`'s batched generation cheap, and the
only place the judge reaches into transformers' internals. Each piece is on by default, can be switched off on
the judge, counts what it does in :data:`STATS` (or the judge's ``stats``), and is proven active and
output-identical (greedy) on the zoo judge by ``tests/unit/test_judge_speedups.py``; ``docs/benchmarks.md`` and
that test file's docstring give its measured worth. Nothing here catches an exception to switch itself off: a
model a piece does not suit fails loudly (switch the piece off for it).

* :class:`PrefixCache` (``prefix_cache``): every chat of a task starts with the same system message (rubric +
  schema, most of the prompt). Its keys/values are computed once per distinct prefix (a small LRU) and handed to
  ``generate`` as its cache, laid out per row of the left-padded batch (zeros under the padding, which the
  attention mask hides), so prefill runs only the per-item tail. Qwen-VL models keep 3-D rope offsets from their
  last prefill in ``rope_deltas`` (a model attribute ``generate`` reads when it starts from a cache):
  :func:`reset_rope_state` clears them so they are recomputed for the whole prompt.
* :func:`preallocated_layer_class` (``preallocated_cache``): the prefix cache's layers write each decoding
  step's keys/values into buffers with room to spare instead of ``DynamicLayer``'s re-concatenation of the
  whole cache per layer per step.
* :func:`cpu_gqa_sdpa_attention` (``gqa_attention``): on CPU, grouped-query attention runs through SDPA's
  ``enable_gqa`` instead of transformers' copy of every key/value head per query group.

Heavy imports (torch, transformers) happen inside functions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

#: Process-wide counts of the attention override's calls: ``gqa_fast`` (SDPA with ``enable_gqa``) and
#: ``gqa_stock`` (handed to transformers' own ``sdpa`` because the call is unusual). Tests read the difference.
STATS: Counter = Counter()

GQA_ATTENTION = "prefmill_cpu_gqa_sdpa"


# ----------------------------------------------------------------------------------------------------------------
# Shared-prefix cache
# ----------------------------------------------------------------------------------------------------------------
def shared_prefix(input_ids: Any, attention_mask: Any, stop_token_ids: Sequence[int],
                  mm_token_type_ids: Any | None = None) -> tuple[int, list[int]] | None:
    """``(P, pads)`` for a left-padded batch: ``P`` is the length of the longest run of text tokens every row starts
    with (the chat template's system message: rubric + schema), cut before the first image/video token and kept
    at least one token short of the shortest row; ``pads`` the left padding of each row. ``None`` when the batch
    is not cleanly left-padded. Pure (tensors in, ints out)."""
    import torch

    rows, width = int(input_ids.shape[0]), int(input_ids.shape[1])
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    lengths = attention_mask.sum(dim=1).tolist()
    pads = [width - int(n) for n in lengths]
    for i, pad in enumerate(pads):
        if int(attention_mask[i, pad:].sum()) != width - pad:  # a hole after the first real token
            return None
    limit = min(int(n) for n in lengths) - 1
    if limit <= 0:
        return None
    first = input_ids[0, pads[0] : pads[0] + limit]
    same = torch.ones(limit, dtype=torch.bool, device=input_ids.device)
    for i in range(1, rows):
        same &= input_ids[i, pads[i] : pads[i] + limit] == first
    if stop_token_ids:
        same &= ~torch.isin(first, torch.tensor(list(stop_token_ids), dtype=first.dtype, device=first.device))
    if mm_token_type_ids is not None:
        same &= mm_token_type_ids[0, pads[0] : pads[0] + limit] == 0
    bad = (~same).nonzero()
    prefix = int(bad[0, 0]) if len(bad) else limit
    return prefix, pads


def reset_rope_state(model: Any) -> None:
    """Forget the position offsets Qwen2-VL-style models keep from their last prefill (``rope_deltas``, on the
    model and its base model), so ``generate`` recomputes them for the whole prompt when it starts from a cache.
    Models without the attribute are left alone."""
    for module in (model, getattr(model, "model", None)):
        if module is not None and getattr(module, "rope_deltas", None) is not None:
            module.rope_deltas = None


_PREALLOCATED_LAYER: Any = None


def preallocated_layer_class():
    """A transformers ``DynamicLayer`` whose keys/values are views into buffers with room to spare, so a decoding
    step writes its new key/value in place instead of re-concatenating the whole cache (``DynamicLayer`` copies
    every key and value of the prompt, per layer, per step: most of a padded batch's decoding time on CPU).
    ``PreallocatedLayer(keys, values, length, stats)`` takes buffers of shape ``(batch, heads, capacity,
    head_dim)`` whose first ``length`` positions are filled, and counts into ``stats`` (a ``Counter``) its
    ``preallocated_in_place`` writes and its ``preallocated_regrow`` copies: a full buffer doubles, and a base-class
    method that replaced the tensors (crop, reorder) makes the next update re-seat them. After the base class's
    ``reset`` it concatenates like ``DynamicLayer``. Defined on first use."""
    global _PREALLOCATED_LAYER
    if _PREALLOCATED_LAYER is None:
        from transformers.cache_utils import DynamicLayer

        class PreallocatedLayer(DynamicLayer):
            def __init__(self, keys, values, length: int, stats: Counter):
                super().__init__()
                self.dtype, self.device = keys.dtype, keys.device
                self._k, self._v = keys, values
                self._stats = stats
                self._view(int(length))
                self.is_initialized = True

            def _view(self, length: int) -> None:
                self.keys, self.values = self._k[..., :length, :], self._v[..., :length, :]
                self._keys_view = self.keys

            def update(self, key_states, value_states, *args, **kwargs):
                if self.keys is None:  # reset by the base class: plain concatenation from here on
                    return super().update(key_states, value_states, *args, **kwargs)
                n = self.keys.shape[-2]
                m = n + key_states.shape[-2]
                if self.keys is not self._keys_view or m > self._k.shape[-2]:
                    self._stats["preallocated_regrow"] += 1
                    capacity = max(m, 2 * n)
                    k = self.keys.new_empty((*self.keys.shape[:-2], capacity, self.keys.shape[-1]))
                    v = self.values.new_empty((*self.values.shape[:-2], capacity, self.values.shape[-1]))
                    k[..., :n, :], v[..., :n, :] = self.keys, self.values
                    self._k, self._v = k, v
                else:
                    self._stats["preallocated_in_place"] += 1
                self._k[..., n:m, :] = key_states
                self._v[..., n:m, :] = value_states
                self._view(m)
                return self.keys, self.values

        _PREALLOCATED_LAYER = PreallocatedLayer
    return _PREALLOCATED_LAYER


class PrefixCache:
    """Keys/values of shared chat prefixes (an LRU of ``size`` distinct prefixes of at least ``min_tokens``
    tokens) and the per-batch ``DynamicCache`` built from them. ``stats`` counts ``prefix_prefill`` (a prefix
    computed), ``prefix_hit`` (a prefix found in the LRU) and ``prefix_used`` (a ``generate`` started from it)."""

    def __init__(self, size: int = 16, min_tokens: int = 32, preallocate: bool = True,
                 stats: Counter | None = None):
        self.size, self.min_tokens, self.preallocate = int(size), int(min_tokens), bool(preallocate)
        self.stats = stats if stats is not None else Counter()
        self._kv: dict[tuple[int, ...], list] = {}  # prefix token ids -> [(keys, values)] per layer

    def clear(self) -> None:
        self._kv.clear()

    def past_for(self, model: Any, inputs: Any, capacity: int, mm_token_ids: Sequence[int]):
        """A ``DynamicCache`` holding the keys/values of the batch's shared prefix, laid out as the left-padded
        batch has it, in buffers with room for ``capacity`` positions; ``None`` when no shared prefix is worth it.
        Clears ``model``'s rope state (:func:`reset_rope_state`) for the ``generate`` call that follows."""
        import torch
        from transformers import DynamicCache

        found = shared_prefix(inputs["input_ids"], inputs.get("attention_mask"), mm_token_ids,
                              inputs.get("mm_token_type_ids"))
        if found is None or found[0] < self.min_tokens:
            return None
        length, pads = found
        row = pads.index(min(pads))
        ids = inputs["input_ids"][row, pads[row] : pads[row] + length]
        key = tuple(ids.tolist())
        kv = self._kv.pop(key, None)
        if kv is None:
            reset_rope_state(model)
            with torch.no_grad():
                cache = model(input_ids=ids[None], use_cache=True).past_key_values
            kv = [(layer.keys, layer.values) for layer in cache.layers]
            self.stats["prefix_prefill"] += 1
        else:
            self.stats["prefix_hit"] += 1
        self._kv[key] = kv  # most recently used last
        while len(self._kv) > self.size:
            self._kv.pop(next(iter(self._kv)))
        columns = length + min(pads)  # cached columns of the padded batch: padding, then (part of) the prefix
        width = max(capacity, columns) if self.preallocate else columns
        padded = []
        for k, v in kv:
            keys = k.new_zeros((len(pads), k.shape[1], width, k.shape[3]))
            values = v.new_zeros((len(pads), v.shape[1], width, v.shape[3]))
            for i, pad in enumerate(pads):
                pad = min(pad, columns)
                keys[i, :, pad:columns] = k[0, :, : columns - pad]
                values[i, :, pad:columns] = v[0, :, : columns - pad]
            padded.append((keys, values))
        cache = DynamicCache()
        if self.preallocate:
            layer_class = preallocated_layer_class()
            cache.layers = [layer_class(k, v, columns, self.stats) for k, v in padded]
        else:
            for i, (k, v) in enumerate(padded):
                cache.update(k, v, i)
        reset_rope_state(model)
        self.stats["prefix_used"] += 1
        return cache


# ----------------------------------------------------------------------------------------------------------------
# Grouped-query attention on CPU
# ----------------------------------------------------------------------------------------------------------------
def cpu_gqa_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                           **kwargs):
    """transformers' ``sdpa`` attention, except that on CPU grouped-query attention runs through SDPA's
    ``enable_gqa`` instead of copying every key/value head ``num_key_value_groups`` times first (transformers only
    does that without a mask, i.e. never for a padded batch). Same kernel and arithmetic (outputs identical);
    the copy is a large part of decoding a padded batch against a long prompt on CPU. Anything unusual (other
    devices, dropout, position bias, paged cache, causal with a cache) goes to the stock function."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = query.shape[2] > 1 and attention_mask is None and causal
    if (groups <= 1 or query.device.type != "cpu" or dropout or kwargs.get("position_bias") is not None
            or kwargs.get("cache") is not None or kwargs.get("output_attentions")
            or (causal and key.shape[2] != query.shape[2]) or key.shape[-1] != value.shape[-1]):
        STATS["gqa_stock"] += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    STATS["gqa_fast"] += 1
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, is_causal=causal, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def use_cpu_gqa_attention(model: Any) -> bool:
    """Switch ``model``'s text decoder from ``sdpa`` to :func:`cpu_gqa_sdpa_attention` (registered with
    transformers' attention and mask interfaces under :data:`GQA_ATTENTION`). True when switched; False when the
    model does not qualify (its decoder is not on ``sdpa``, or has as many key/value heads as query heads).
    A qualifying model that refuses the switch raises."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    text_config = model.config.get_text_config(decoder=True)
    if getattr(text_config, "_attn_implementation", None) != "sdpa":
        return False
    heads = getattr(text_config, "num_attention_heads", None)
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    if not heads or heads == kv_heads:
        return False
    AttentionInterface.register(GQA_ATTENTION, cpu_gqa_sdpa_attention)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
    key = next((name for name in getattr(model.config, "sub_configs", {}) or {}
                if getattr(model.config, name, None) is text_config), "")
    try:
        model.set_attn_implementation({key: GQA_ATTENTION} if key else GQA_ATTENTION)
    except (ValueError, KeyError, ImportError) as e:  # loud: say which switch turns it off
        raise RuntimeError(f"{type(model).__name__} refuses the {GQA_ATTENTION} attention ({type(e).__name__}: {e}); "
                           "pass gqa_attention=False") from e
    if getattr(text_config, "_attn_implementation", None) != GQA_ATTENTION:
        raise RuntimeError(f"{type(model).__name__}: set_attn_implementation did not switch the text decoder to "
                           f"{GQA_ATTENTION} (pass gqa_attention=False)")
    return True
