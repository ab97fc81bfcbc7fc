"""Diagnose: which top-k the detector rejects in each graph of the static-cache generate recipe (GPU)."""
import sys

import torch

sys.path.insert(0, "tests")
import hf_oracle as H  # noqa: E402

from fx_indexcache import IndexCacheBackend, prepared_static_cache  # noqa: E402
from fx_indexcache.detection import registry  # noqa: E402

original = registry.detect


def spy(graph, *args, **kwargs):
    found = original(graph, *args, **kwargs)
    print(f"graph: {len(found.sites)} sites, {len(found.unplaced)} unplaced, source {found.layer_source}, "
          f"unknown {found.unknown_text}")
    for site, why in found.unplaced:
        print("  unplaced", site.module_path, why)
    if not found.sites:
        for verdict in found.ignored:
            print("  ignored", verdict.node.name, verdict.reason[:200])
    return found


registry.detect = spy
import fx_indexcache.integrations.graph_pass as gp  # noqa: E402

gp.detect = spy
tiny = H.TINY_DSA_MODELS["deepseek_v32"]()
model = tiny.model.cuda()
prompts = [tiny.make_inputs(n, seed=i)["input_ids"].cuda() for i, n in enumerate((9, 13, 16))]
cache = prepared_static_cache(model, 1, 16 + 4 + 1)
backend = IndexCacheBackend(index_topk_pattern="FSS")
model.forward = torch.compile(model.forward, backend=backend, mode="reduce-overhead")
with torch.no_grad():
    for ids in prompts:
        cache.reset()
        model.generate(ids, max_new_tokens=4, do_sample=False, past_key_values=cache, disable_compile=True)
for report in backend.reports:
    print(report.format())
