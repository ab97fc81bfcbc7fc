"""Stage 1, detection: which top-k in a graph are DSA indexers, and which decoder layer each belongs to.

``registry`` runs the site finders (``topk`` for plain-torch graphs, ``vllm_op`` for vLLM's opaque
indexer op, ``block_topk`` for block indexers such as MiniMax-M3's, ``sort_topk`` for a top-k written as a sort
cut to its first k keys) and numbers the layers (``layers``,
``layer_records``, ``frames``); ``sites`` says what a site is, ``symbolic`` proves two sites' sizes
equal; ``graph_inputs`` knows which placeholders are parameters. Depends only on ``config`` and
``graph_utils``.
"""

from . import block_topk  # noqa: E402,F401  (registers the block-indexer site finder)
from . import sort_topk  # noqa: E402,F401  (registers the sort-cut site finder)
