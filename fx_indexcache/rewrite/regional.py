"""IndexCache with regional compilation: one ``nested_compile_region`` body called by every layer.

The outer graph calls the layer body through ``invoke_subgraph`` once per layer, each call under its
layer's module path (``layers.3``), so the layer of every call is known. The body itself is shared, so
no rewrite inside it can tell F from S. Instead the outer graph gets two more bodies:

* an **F body**: the body plus its indexer's indices as one more output;
* an **S body**: the body with one more input in place of its indices (its indexer is then dead).

F calls switch to the F body, S calls to the S body fed with their F call's indices; each kind keeps
sharing one compiled body. A layer is left calling the original body, with the reason, wherever this
is not provably the same computation (index unknown, F call absent or after the S call, shapes differ).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from ..config import FULL, IndexCacheConfig
from ..detection.layers import layer_index_from_path, module_path
from ..detection.registry import detect
from ..detection.sites import different_selections
from ..graph_utils import copy_graph_module
from ..graph_utils import comes_after, fake_value, same_shape, same_size
from .indices_io import CallAction, with_indices_input, with_indices_output

_INVOKE = getattr(torch.ops.higher_order, "invoke_subgraph", None)


@dataclasses.dataclass(frozen=True)
class RegionCall:
    """What one layer's call of a compiled region became."""

    layer: int | None
    marked: str
    action: CallAction
    body: str  # the body it calls now
    region: str = ""  # the body it called before
    source_layer: int | None = None  # READ: the F layer whose indices it takes
    note: str = ""


@dataclasses.dataclass
class _Body:
    name: str
    module: fx.GraphModule
    site: object  # the body's single indexer site


@dataclasses.dataclass
class _Call:
    node: fx.Node
    layer: int | None
    body: _Body | None


def _bodies(gm: fx.GraphModule) -> dict[str, _Body | None]:
    """Each called body with exactly one replaceable indexer site that selects from a score tensor (``key_axis``:
    a top-k, a sort cut to k); None for the others."""
    found: dict[str, _Body | None] = {}
    for node in gm.graph.nodes:
        if node.target is not _INVOKE or node.args[0].op != "get_attr":
            continue
        name = str(node.args[0].target)
        if name in found:
            continue
        module = getattr(gm, name)
        detection = detect(module.graph)  # layer unknown inside a body: only the site itself matters here
        sites = detection.sites
        ok = (len(sites) == 1 and not detection.hidden and sites[0].key_axis() is not None
              and sites[0].refusal() is None)
        found[name] = _Body(name, module, sites[0]) if ok else None
    return found


def _f_body(body: _Body) -> fx.GraphModule:
    return with_indices_output(copy_graph_module(body.module))


def _s_body(body: _Body) -> fx.GraphModule | None:
    built = with_indices_input(copy_graph_module(body.module), fake_value(body.site.indices))
    return None if built is None else built[0]


def _install(gm: fx.GraphModule, name: str, module: fx.GraphModule) -> str:
    gm.register_module(name, module)
    return name


def _call(gm: fx.GraphModule, old: fx.Node, body: str, operands: tuple, val) -> fx.Node:
    graph = gm.graph
    with graph.inserting_before(old):
        attr = graph.get_attr(body)
        new = graph.call_function(_INVOKE, (attr, body, *operands))
    new.meta = {**old.meta, "val": val}
    new.meta.pop("eager_input_vals", None)  # recorded for the old operands; Inductor then reads each operand's val
    return new


def share_across_regions(gm: fx.GraphModule, config: IndexCacheConfig) -> list[RegionCall]:
    """Rewire the outer graph's region calls (see the module docstring); one record per call with a site."""
    if _INVOKE is None or not config.use_index_cache:
        return []
    bodies = _bodies(gm)
    calls = [_Call(n, layer_index_from_path(module_path(n)), bodies.get(str(n.args[0].target)))
             for n in gm.graph.nodes if n.target is _INVOKE and n.args[0].op == "get_attr"]
    calls = [call for call in calls if call.body is not None]
    layers = [call.layer for call in calls]
    if not calls or None in layers or len(set(layers)) != len(layers):
        why = "a region call without a layer number in its module path, or two calls claiming one layer"
        return [RegionCall(c.layer, "?", CallAction.COMPUTED, c.body.name, c.body.name, note=why) for c in calls]
    marked_s = [c for c in calls if config.layer_kind(c.layer) != FULL and config.source_layer(c.layer) is not None]
    if not marked_s:
        return []  # nothing would read: the graph stays as it came
    by_layer = {call.layer: call for call in calls}
    f_bodies: dict[str, str] = {}
    s_bodies: dict[str, str | None] = {}
    published: dict[int, fx.Node] = {}
    records = []
    for call in sorted(calls, key=lambda c: c.layer):
        records.append(_rewire(gm, call, by_layer, config, f_bodies, s_bodies, published))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return records


def _refusal(call: _Call, source: _Call | None, published: dict) -> str | None:
    if source is None or source.layer not in published:
        return "its F layer calls no region with an indexer in this graph"
    if comes_after(published[source.layer], call.node):  # the F call's indices (a live node) come later
        return "its F layer's call comes after this one"
    site, source_site = call.body.site, source.body.site
    different = different_selections(site, source_site, "its F layer")
    if different is not None:
        return different
    mine, theirs = fake_value(site.indices), fake_value(source_site.indices)
    if mine is None or theirs is None or mine.dtype != theirs.dtype or not same_shape(mine.shape, theirs.shape):
        return "its indices differ in shape or dtype from its F layer's"
    if site.key_width_mismatch(source_site, same_size) is not None:  # (two bodies: sizes compared across graphs)
        return "it scores another number of keys than its F layer"
    return None


def _rewire(gm, call: _Call, by_layer, config, f_bodies, s_bodies, published) -> RegionCall:
    layer, body, node = call.layer, call.body, call.node
    marked = config.layer_kind(layer)
    source_layer = config.source_layer(layer) if marked != FULL else None
    if marked == FULL or source_layer is None:
        name = f_bodies.get(body.name) or _install(gm, f"{body.name}_indexcache_f", _f_body(body))
        f_bodies[body.name] = name
        indices_val = fake_value(body.site.indices)
        new = _call(gm, node, name, tuple(node.args[2:]), (*fake_value(node), indices_val))
        node.replace_all_uses_with(new)
        with gm.graph.inserting_after(new):
            indices = gm.graph.call_function(operator.getitem, (new, len(fake_value(node))))
        indices.meta = {**node.meta, "val": indices_val}
        gm.graph.erase_node(node)
        published[layer] = indices
        note = "" if marked == FULL else "marked S with no F layer before it: computed as F"
        return RegionCall(layer, marked, CallAction.PUBLISHED, name, body.name, note=note)
    why = _refusal(call, by_layer.get(source_layer), published)
    if why is None and body.name not in s_bodies:
        built = _s_body(body)
        s_bodies[body.name] = None if built is None else _install(gm, f"{body.name}_indexcache_s", built)
    if why is None and s_bodies[body.name] is None:
        why = "without its indices the body's indexer is still needed"
    if why is not None:
        return RegionCall(layer, marked, CallAction.COMPUTED, body.name, body.name, note=why)
    name = s_bodies[body.name]
    new = _call(gm, node, name, (*node.args[2:], published[source_layer]), fake_value(node))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return RegionCall(layer, marked, CallAction.READ, name, body.name, source_layer)
