"""The layer number the pass gave each surviving indexer site, written into the graph itself.

A second application of the pass (an exported program rewritten twice, or rewritten and then
compiled with the backend) must not number the survivors afresh: after ``FSFS`` the graph holds
layers 0 and 2, which graph order would call 0 and 1. So the pass writes each surviving site's
layer (and the S layers it serves) into ``node.meta["custom"]``, the metadata key that torch
carries through ``ExportedProgram.module()``, dynamo's re-trace and AOTAutograd, and a later
application reads it back instead of guessing.
"""

from __future__ import annotations

import dataclasses

from torch import fx

_KEY = "fx_indexcache"


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """What an earlier rewrite knew about one surviving site."""

    layer: int
    serves: tuple[int, ...] = ()  # S layers that read this site's indices since that rewrite


def read_record(node: fx.Node) -> LayerRecord | None:
    entry = (node.meta.get("custom") or {}).get(_KEY)
    if not isinstance(entry, dict) or not isinstance(entry.get("layer"), int):
        return None
    return LayerRecord(entry["layer"], tuple(entry.get("serves", ())))


def write_record(node: fx.Node, record: LayerRecord) -> None:
    """Record on ``node``; a fresh dict, since torch may share one ``custom`` dict among many nodes."""
    custom = dict(node.meta.get("custom") or {})
    custom[_KEY] = {"layer": record.layer, "serves": list(record.serves)}
    node.meta["custom"] = custom
