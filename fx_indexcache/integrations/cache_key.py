"""What the layer numbers of a graph rest on, for the pass's ``uuid`` (and so Inductor's FX graph cache key).

Inductor keys a cached graph by its code, its config and the custom passes' ``uuid()``. The code of two graphs
that run different layers can be the same: two pipeline stages of one model class (``self.layers[start:end]``
with two layers each), or one model class compiled over two spans. The pass numbers layers from the module paths
the graph was traced under and from the records an earlier rewrite left in it, neither of which is in the code,
so the second stage would be served the first stage's rewrite (its layer 3 reading layer 2's indices where
both are F). The digest of those paths and records goes into the ``uuid``: graphs numbered alike share cache
entries (every instance of one model), graphs numbered differently do not.
"""

from __future__ import annotations

import hashlib

from torch import fx

from ..detection.layer_records import read_record
from ..detection.layers import normalise_module_path


def numbering_digest(graph: fx.Graph) -> str:
    """A digest of the module paths of ``graph``'s nodes and the layer records in them ("" for a graph that has
    neither)."""
    paths: set[str] = set()
    records: set[str] = set()
    for node in graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            paths.add(normalise_module_path(str(path)))
        record = read_record(node)
        if record is not None:
            records.add(f"{node.name}:{record.layer}:{record.serves}")
    if not paths and not records:
        return ""
    text = "\n".join(sorted(paths)) + "\n--\n" + "\n".join(sorted(records))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
