"""Where the split top-k's time goes: per-kernel times, launch overrides, and probes of the filter pass.

Run from the repository root on a CUDA machine::

    PYTHONPATH=. python benchmarks/bench_topk_phases.py --out "$OUT" [--quick]

For each shape (the logits kernel's own causal rows, k = 2048) it measures:
  * ``row_topk`` (unsorted and sorted) end to end (do_bench median) and each of its kernels' GPU time
    (torch.profiler), with the registers / spills Triton compiled each kernel with;
  * the same under launch overrides (``topk._launch(tune=...)``: the filter's and the select's warps, the
    filter's chunk, the sample size), one factor at a time around the default;
  * probes of the filter pass alone (``_stream_probe`` below): one read of the rows with a count per chunk,
    then with the chunk's scan added, then with the scattered stores: which step the pass is bound by.
``--sections stamps`` instead reads the wide CUDA block's clock at each of its phases (``measure_stamps``).
Writes topk_phases.{json,md} under --out.
"""

import argparse
import contextlib
import json
import os
import re
import sys
from statistics import median_high
from unittest import mock

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from bench_environment import kernel_times  # noqa: E402
from bench_indexer_kernel import bench, causal_logits, environment, graph_ms, topk_exact  # noqa: E402

from fx_indexcache.fuse.kernels import programmatic_launch  # noqa: E402
from fx_indexcache.fuse.kernels import topk as tk  # noqa: E402

TOPK = 2048
SHAPES = [(1024, 32768), (1024, 131072), (64, 32768), (4096, 8192), (1, 32768)]
QUICK = 3
#: Run 6a also timed filter_warps 8, select_warps 16, chunk 4096 and samples of 1024 / 4096 keys: all slower;
#: run 6b the sampled threshold in a launch of its own (as fast as the filter finding it at chunk 1024: dropped).
#: Session 8: the CUDA kernel (``topk_cuda``, the default where it loads) against the Triton split kernels.
TUNES = [{"algorithm": "cuda"}, {"algorithm": "split"}, {"algorithm": "split", "prefix_skip": True}]
#: Decode rows (split over programs), replayed in a CUDA graph: the k-th key's search skipping the bits its
#: bounds share (``prefix_skip``, off by default until measured), the select in the last split's program or in a
#: launch of its own (run 7: the first only for one row). Run 7 also timed select_warps 4: slower everywhere.
DECODE_SHAPES = [(1, 32768), (16, 32768), (64, 32768), (1, 131072), (4, 131072)]
DECODE_TUNES = [{"algorithm": "cuda"}, {"algorithm": "split"}, {"algorithm": "split", "prefix_skip": True}]


@triton.jit
def _stream_probe(x_ptr, out_ptr, L, T, sxr, CHUNK: tl.constexpr, MODE: tl.constexpr):
    """One program a row: MODE 0 counts keys > L per chunk; 1 adds the chunk's scan; 2 adds the stores."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * sxr
    o_row = out_ptr + row * 8192
    n = tl.full([], 0, tl.int32)
    for c in range(0, tl.cdiv(T, CHUNK)):
        co = c * CHUNK + tl.arange(0, CHUNK)
        kc = tl.load(x_row + co, mask=co < T, other=-float("inf"))
        gt = kc > L
        if MODE >= 1:
            pos = n + tl.cumsum(gt.to(tl.int32), axis=0) - 1
            # MODE 1: a store that never fires keeps the scan alive without its memory traffic
            hit = gt & (pos < 8192) if MODE >= 2 else gt & (pos == -12345)
            tl.store(o_row + pos, co, mask=hit)
        n += tl.sum(gt.to(tl.int32), axis=0)
    tl.store(out_ptr + row * 8192, n)


def compiled_info() -> dict:
    """Registers, spills and shared memory of every top-k kernel compiled so far (by kernel name)."""
    info = {}
    for name, fn in tk._kernels().items():
        try:
            for dev_cache in getattr(fn, "device_caches", {}).values():
                for ck in dev_cache[0].values():
                    info.setdefault(name, []).append(dict(regs=ck.n_regs, spills=ck.n_spills,
                                                          smem=ck.metadata.shared, warps=ck.metadata.num_warps))
        except Exception as e:  # the cache's layout is Triton's own business: report, do not fail
            info[name] = f"unreadable: {type(e).__name__}: {e}"
    from fx_indexcache.fuse.kernels import topk_cuda

    if topk_cuda.available(torch.device("cuda")):
        for name, kern in topk_cuda._kernels(torch.cuda.current_device()).items():
            info[name] = kern.attributes()
    return info


def launch(x2d, out, sorted_, t):
    t = dict(t)
    sample = t.pop("sample", None)
    algorithm = t.pop("algorithm", "auto")
    return tk._launch(x2d, out, TOPK, sorted=sorted_, sample=sample, algorithm=algorithm, tune=t)


def time_tune(x, out, t, timer, suffix: str) -> dict:
    """One launch override, sorted and unsorted: exactness before and after the timer's many runs (a race
    would show in the last), the timer's ms (key ``<tag><suffix>``) and each kernel's profiled time."""
    row = dict(tune=t)
    for sorted_ in (False, True):
        tag = "sorted" if sorted_ else "unsorted"
        launch(x, out, sorted_, t)
        row[f"exact_{tag}"] = topk_exact(x, out, TOPK)
        row[f"{tag}{suffix}"] = round(timer(lambda: launch(x, out, sorted_, t)), 4)
        row[f"exact_{tag}_after_replays"] = topk_exact(x, out, TOPK)
        row[f"{tag}_kernels"] = kernel_times(lambda: launch(x, out, sorted_, t))
    return row


def measure_shape(R, T, log) -> dict:
    x = causal_logits(1, R, T).reshape(R, T) if R > 1 else torch.randn(R, T, device="cuda")
    out = torch.empty(R, TOPK, dtype=torch.int32, device="cuda")
    res = dict(R=R, T=T, torch_unsorted_ms=bench(lambda: torch.topk(x, TOPK, dim=-1, sorted=False)), tunes=[])
    for t in TUNES:
        row = time_tune(x, out, t, bench, "_ms")
        log(f"{R}x{T} {t}: {row['unsorted_ms']} / {row['sorted_ms']} ms  {row['unsorted_kernels']}")
        res["tunes"].append(row)
    if R >= 256:
        L = float(torch.quantile(x[0, : min(T, 1 << 24)].float(), 1 - 2.5 * TOPK / T))
        probe = torch.empty(R, 8192, dtype=torch.int32, device="cuda")
        for mode in (0, 1, 2):
            for chunk in (1024, 2048, 4096):
                ms = bench(lambda: _stream_probe[(R,)](x, probe, L, T, x.stride(0), CHUNK=chunk, MODE=mode, num_warps=4))
                res[f"probe_mode{mode}_chunk{chunk}_ms"] = round(ms, 4)
        log(f"{R}x{T} probes: " + ", ".join(f"{k[6:]}={v}" for k, v in res.items() if k.startswith("probe")))
    res["floor_ms"] = round(R * T * 4 / 4.2e12 * 1e3, 4)
    return res


def measure_decode(R, T, log) -> dict:
    """Split rows under CUDA-graph replay (what decode runs), each tune, sorted and unsorted."""
    x = torch.randn(R, T, device="cuda")
    out = torch.empty(R, TOPK, dtype=torch.int32, device="cuda")
    res = dict(R=R, T=T, splits=tk.split_plan(R, T)["NSPLIT"], tunes=[],
               torch_unsorted_graph_ms=round(graph_ms(lambda: torch.topk(x, TOPK, dim=-1, sorted=False)), 4))
    for t in DECODE_TUNES:
        row = time_tune(x, out, t, graph_ms, "_graph_ms")
        log(f"decode {R}x{T} {t}: graph {row['unsorted_graph_ms']} / {row['sorted_graph_ms']} ms "
            f"exact {row['exact_unsorted']}/{row['exact_sorted']}  {row['unsorted_kernels']}")
        res["tunes"].append(row)
    return res


#: The wide CUDA block's phases, in the order of its stamps (``topk_cuda.cu``: STAMP(1) ... STAMP(7)).
STAMP_PHASES = ("sample loaded", "sample's k-th key", "filter", "candidates' k-th key", "count above", "output",
                "sort")
STAMP_SHAPES = [(1, 8192), (1, 32768), (1, 65536), (64, 32768)]
#: ... and replay: also the long single rows where the default splits the row over 256-thread blocks ("cuda").
REPLAY_SHAPES = STAMP_SHAPES + [(1, 131072), (1, 262144)]


def stamp_slots() -> int:
    """u64 slots the stamps build writes (``STAMP_SLOTS`` in topk_cuda.cu): 0-7 the phases, 14-15 the global timer,
    16 on the steps inside the phases (read from the source, so the two cannot drift apart)."""
    from fx_indexcache.fuse.kernels import topk_cuda

    return int(re.search(r"#define STAMP_SLOTS (\d+)", topk_cuda.SOURCE.read_text()).group(1))


def measure_stamps(R, T, log, algorithm="cuda_wide", reps=50) -> dict:
    """Where the launch ``algorithm``'s time goes (a process whose CUDA top-k was built with -DTOPK_STAMPS: block
    0's clock at each phase boundary): median cycles per phase, the global timer's ns over the block, the kernel's
    profiled GPU time and its CUDA-graph replay time. Rows: the logits kernel's own (causal, V3.2's indexer)."""
    x = causal_logits(1, R, T).reshape(R, T)
    out = torch.empty(R, TOPK, dtype=torch.int32, device="cuda")
    slots = stamp_slots()
    stamps = torch.zeros(2 * slots, dtype=torch.int32, device="cuda")  # the kernel writes u64[slots] through its path
    res = dict(R=R, T=T, algorithm=algorithm)
    for sorted_ in (False, True):
        tag = "sorted" if sorted_ else "unsorted"

        def launch(path=None, sorted_=sorted_):
            return tk._launch(x, out, TOPK, sorted=sorted_, path=path, algorithm=algorithm)

        runs = []
        for _ in range(reps):
            stamps.zero_()
            launch(stamps)
            torch.cuda.synchronize()
            runs.append(stamps.view(torch.int64).cpu().tolist())
        phases = {}
        for i, name in enumerate(STAMP_PHASES, start=1):
            if all(r[i] and r[i - 1] for r in runs):
                phases[name] = median_high([r[i] - r[i - 1] for r in runs])
        done = [r for r in runs if r[7] and r[0]]
        # the steps inside the phases (STAMP_STEP: histogram passes, compaction chunks; the first follows the sample's
        # loads), cycles since the step before
        steps = [median_high([r[i] - (r[i - 1] if i > 16 else r[1]) for r in runs])
                 for i in range(16, slots) if all(r[i] for r in runs)]
        res[tag] = dict(
            cycles=phases, steps_after_sample=steps, total_cycles=median_high([r[7] - r[0] for r in done]) if done else None,
            block_ns=median_high([r[14] - r[15] for r in runs]),
            kernel_ms=kernel_times(launch), graph_ms=round(graph_ms(launch), 4),
            exact=topk_exact(x, out, TOPK))
        log(f"stamps {R}x{T} {tag}: {res[tag]}")
    return res


def measure_replay(R, T, log, algorithm="cuda_wide") -> dict:
    """The CUDA top-k launch ``algorithm`` alone and after the logits kernel, replayed in a CUDA graph (a build
    without stamps: the product's own timing, for comparing launches and build variants), unsorted, on the logits
    kernel's own rows."""
    from bench_indexer_kernel import SCALE, make_inputs

    from fx_indexcache.fuse.kernels.lightning_indexer import indexer_logits

    q, k, w = make_inputs(R, 1, T, seed=R)  # a decode batch: R requests, one query each
    x = indexer_logits(q, k, w, scale=SCALE).reshape(R, T)
    out = torch.empty(R, TOPK, dtype=torch.int32, device="cuda")

    def topk():
        tk._launch(x, out, TOPK, algorithm=algorithm)

    def logits_topk():
        indexer_logits(q, k, w, scale=SCALE, out=x.view(R, 1, T))
        topk()

    res = dict(R=R, T=T, algorithm=algorithm, programmatic_launch=programmatic_launch.allowed(x.device),
               topk_graph_ms=round(graph_ms(topk), 4), logits_topk_graph_ms=round(graph_ms(logits_topk), 4),
               exact=topk_exact(x, out, TOPK))
    log(f"replay {R}x{T}: {res}")
    return res


class _LaunchPlain:
    """Stands in for ``programmatic_launch`` in one kernel module: its launches stay plain whatever the device."""

    @staticmethod
    def allowed(device) -> bool:
        return False


@contextlib.contextmanager
def _programmatic(logits: bool, topk: bool):
    """Launches of the logits kernel and of the CUDA top-k programmatic or plain, each on its own (the device's
    decision where asked for, plain otherwise)."""
    from fx_indexcache.fuse.kernels import lightning_indexer as li
    from fx_indexcache.fuse.kernels import topk_cuda

    with contextlib.ExitStack() as stack:
        for module, on in ((li, logits), (topk_cuda, topk)):
            if not on:
                stack.enter_context(mock.patch.object(module, "programmatic_launch", _LaunchPlain))
        yield


def measure_programmatic_parts(R, T, log, algorithm="cuda_wide", rounds=5) -> dict:
    """Which launch programmatic launch helps or hurts: the logits kernel and the top-k after it, each plain or
    programmatic (four combinations), with one logits config (the default's under programmatic launch), replayed in
    CUDA graphs; the median of ``rounds`` medians for the logits alone and for logits + top-k, the rounds of the
    four combinations interleaved so that a drift of the card's clock reaches all four alike."""
    from bench_indexer_kernel import SCALE, make_inputs

    from fx_indexcache.fuse.kernels import lightning_indexer as li

    q, k, w = make_inputs(R, 1, T, seed=R)
    cfg = li.default_config(R, 1, T, q.shape[2], q.shape[3], q.device, "bf16")
    x = li.indexer_logits(q, k, w, scale=SCALE, config=cfg).reshape(R, T)
    out = torch.empty(R, TOPK, dtype=torch.int32, device="cuda")

    def logits():
        li.indexer_logits(q, k, w, scale=SCALE, out=x.view(R, 1, T), config=cfg)

    def logits_topk():
        logits()
        tk._launch(x, out, TOPK, algorithm=algorithm)

    combos = [(lp, tp) for lp in (False, True) for tp in (False, True)]
    times = {c: {"logits": [], "logits_topk": []} for c in combos}
    exact = {}
    for _ in range(rounds):
        for combo in combos:
            with _programmatic(*combo):
                times[combo]["logits"].append(graph_ms(logits))
                times[combo]["logits_topk"].append(graph_ms(logits_topk))
                exact[combo] = topk_exact(x, out, TOPK)
    res = dict(R=R, T=T, algorithm=algorithm, logits_config=cfg.name(), rounds=rounds,
               device_allows=programmatic_launch.allowed(x.device), combinations=[
                   dict(logits_programmatic=lp, topk_programmatic=tp,
                        logits_graph_us=round(1000 * median_high(times[(lp, tp)]["logits"]), 2),
                        logits_topk_graph_us=round(1000 * median_high(times[(lp, tp)]["logits_topk"]), 2),
                        logits_topk_rounds_us=[round(1000 * t, 2) for t in times[(lp, tp)]["logits_topk"]],
                        exact=exact[(lp, tp)]) for lp, tp in combos])
    log(f"programmatic parts {R}x{T} ({cfg.name()}): " + "; ".join(
        f"logits {'P' if c['logits_programmatic'] else '-'} top-k {'P' if c['topk_programmatic'] else '-'}: "
        f"{c['logits_graph_us']} / {c['logits_topk_graph_us']} us" for c in res["combinations"]))
    return res


def measure_binned(R, T, log) -> dict:
    """The wide block with its threshold from the rows' binned counts beside its sample, replayed in CUDA graphs on
    the logits kernel's own rows, unsorted: the top-k alone (counts made outside the graph by
    ``topk_cuda.row_bins``: what sampling costs the top-k), and the whole step with the logits kernel counting its
    keys (a key-rows launch: ``indexer_logits(bins=...)``, the counts zeroed first by a memset in the graph) against
    the same logits launch without counts followed by the sampled top-k."""
    from bench_indexer_kernel import SCALE, make_inputs

    from fx_indexcache.fuse.kernels import lightning_indexer as li
    from fx_indexcache.fuse.kernels import topk_cuda

    indexer_logits = li.indexer_logits
    q, k, w = make_inputs(R, 1, T, seed=R)
    cfg = li.default_config(R, 1, T, q.shape[2], q.shape[3], q.device, "bf16")
    if cfg.kind != "key_rows":  # (only key-rows launches count)
        cfg = li.LogitsConfig("key_rows", 1, 128, 4, 1)
    x = indexer_logits(q, k, w, scale=SCALE, config=cfg).reshape(R, T)
    bins = topk_cuda.row_bins(x)
    out = torch.empty(R, TOPK, dtype=torch.int32, device="cuda")
    res = dict(R=R, T=T, logits_config=cfg.name(), programmatic_launch=programmatic_launch.allowed(x.device))

    def sampled():
        tk._launch(x, out, TOPK, algorithm="cuda_wide")

    def binned():
        tk._launch(x, out, TOPK, algorithm="cuda_wide", bins=bins)

    def logits():
        indexer_logits(q, k, w, scale=SCALE, out=x.view(R, 1, T), config=cfg)

    def counted_logits():
        bins.zero_()
        indexer_logits(q, k, w, scale=SCALE, out=x.view(R, 1, T), config=cfg, bins=bins)

    steps = dict(sampled_topk=sampled, binned_topk=binned, logits=logits, counted_logits=counted_logits,
                 logits_sampled_topk=lambda: (logits(), sampled()),
                 counted_logits_binned_topk=lambda: (counted_logits(), binned()))
    for name, fn in steps.items():
        res[f"{name}_graph_ms"] = round(graph_ms(fn), 4)
        if name.endswith("topk"):
            res[f"{name}_exact"] = topk_exact(x, out, TOPK)
    counted_logits()
    res["counts_match_the_logits"] = bool(torch.equal(bins, topk_cuda.row_bins(x)))
    for name, opts in (("sampled", {}), ("binned", dict(bins=bins))):
        path = torch.full((R,), -1, dtype=torch.int32, device="cuda")
        tk._launch(x, out, TOPK, algorithm="cuda_wide", path=path, **opts)
        res[f"{name}_paths"] = sorted(set(path.tolist()))
    log(f"binned {R}x{T}: {res}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT"), required="OUT" not in os.environ,
                    help="folder for this run's files (default $OUT); nothing is written into the checkout unasked")
    ap.add_argument("--quick", action="store_true", help=f"the first {QUICK} shapes only")
    ap.add_argument("--sections", default="prefill,decode", help="prefill (SHAPES, eager) and / or decode "
                    "(DECODE_SHAPES, CUDA graphs), replay (REPLAY_SHAPES: the CUDA top-k's graph replay time, "
                    "alone and after the logits), binned (the wide block's threshold from the rows' binned counts against its "
                    "sample), programmatic_parts (REPLAY_SHAPES: the logits and the top-k each launched plain or "
                    "programmatic, medians of five rounds), or stamps alone (its phases, from a build with -DTOPK_STAMPS)")
    ap.add_argument("--algorithm", default="cuda_wide", choices=("cuda_wide", "cuda_cluster", "cuda", "auto"),
                    help="the CUDA top-k launch that --sections stamps / replay time (default: the wide block; "
                    "auto: what row_topk picks for each shape)")
    args = ap.parse_args()
    if "stamps" in args.sections.split(","):  # before the CUDA top-k first compiles: every launch of it stamps
        if args.sections != "stamps":
            ap.error("--sections stamps runs alone (its build of the CUDA top-k records no paths)")
        os.environ["FX_INDEXCACHE_NVRTC_FLAGS"] = (os.environ.get("FX_INDEXCACHE_NVRTC_FLAGS", "") + " -DTOPK_STAMPS").strip()
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "topk_phases_log.txt"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    env = environment(log)
    sections = set(args.sections.split(","))
    jobs = [(measure_shape, s) for s in (SHAPES[:QUICK] if args.quick else SHAPES) if "prefill" in sections]
    jobs += [(measure_decode, s) for s in DECODE_SHAPES if "decode" in sections]
    jobs += [(measure_stamps, s) for s in STAMP_SHAPES if "stamps" in sections]
    jobs += [(measure_replay, s) for s in REPLAY_SHAPES if "replay" in sections]
    jobs += [(measure_binned, s) for s in STAMP_SHAPES if "binned" in sections]
    jobs += [(measure_programmatic_parts, s) for s in REPLAY_SHAPES if "programmatic_parts" in sections]
    launch = {measure_stamps: dict(algorithm=args.algorithm), measure_replay: dict(algorithm=args.algorithm),
              measure_programmatic_parts: dict(algorithm=args.algorithm)}
    results = []
    for measure, (R, T) in jobs:
        try:
            results.append(measure(R, T, log, **launch.get(measure, {})))
        except Exception as e:  # one shape failing does not lose the others
            log(f"{measure.__name__} {R}x{T} failed: {type(e).__name__}: {e}")
    env["compiled"] = compiled_info()
    log(f"compiled: {env['compiled']}")
    with open(os.path.join(args.out, "topk_phases.json"), "w") as f:
        json.dump(dict(env=env, results=results), f, indent=1)


if __name__ == "__main__":
    main()
