"""A transformers ``StaticCache`` whose buffers exist before the first compiled call.

transformers allocates a static cache's tensors lazily, in the model's first forward. When that forward is
compiled, the allocation is traced into the graph. With transformers 5.17 and torch 2.11 (the GPU machine's
versions), that breaks the DSA models: the indexer's position counter starts as a CPU tensor and is moved to the
device inside the graph, and Inductor lowers ``arange + counter`` to float64 indices, so ``index_copy_`` fails
(``LoweringException: indices must be int64``). This happens with plain Inductor too.
``generate(cache_implementation="static")`` initialises the attention K/V up front but not the indexer keys.
transformers 5.19 creates the counter on the device, so the problem does not appear there.

``prepared_static_cache`` runs one eager forward pass of one token through a new cache. That allocates every
buffer (K/V, indexer keys, counters) on the model's device, as the model itself does it, so this works for every
model and version. It then resets the cache. Pass the result as ``generate(..., past_key_values=cache)``, and call
``cache.reset()`` before each later generate() call.
"""

from __future__ import annotations

from typing import Any

import torch


def _eager_forward(model: Any):
    """``model.forward`` without a ``torch.compile`` wrapper the user may have put on it."""
    forward = model.forward
    return getattr(forward, "_torchdynamo_orig_callable", forward)


def prepared_static_cache(model: Any, batch_size: int, max_cache_len: int) -> Any:
    """A ``transformers.StaticCache`` for ``model`` with every layer's buffers allocated and zeroed."""
    from transformers import StaticCache

    for field, value in (("batch_size", batch_size), ("max_cache_len", max_cache_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"prepared_static_cache: {field}={value!r}, expected a positive int")
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    device = next(model.parameters()).device
    ids = torch.zeros((batch_size, 1), dtype=torch.long, device=device)
    with torch.no_grad():
        _eager_forward(model)(input_ids=ids, past_key_values=cache, use_cache=True)
    cache.reset()
    return cache
