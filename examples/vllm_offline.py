"""Offline vLLM generation with IndexCache applied by fx_indexcache's post-grad pass (GPU).

    VLLM_USE_BREAKABLE_CUDAGRAPH=0 VLLM_ENABLE_V1_MULTIPROCESSING=0 \
        python examples/vllm_offline.py --model deepseek-ai/DeepSeek-V3.2 --tp 8 --freq 4

    python examples/vllm_offline.py --dry-run     # CPU: build the configs, print the pattern, exit

Caveats (see examples/vllm_serve.md):
* ``VLLM_USE_BREAKABLE_CUDAGRAPH=0``: with breakable CUDA graphs (vLLM's default for the V3.2
  architectures) vLLM compiles nothing, and the pass never runs;
* the architecture is overridden to ``DeepseekV3ForCausalLM``: vLLM's CUDA DeepSeek-V3.2 module
  runs its indexer eagerly, outside any compiled graph; the generic implementation compiles it;
* ``use_inductor_graph_partition``: the indexer op is a default splitting op; without graph
  partition (or ``splitting_ops=[]``) every indexer call runs outside the graphs the pass sees;
* the pattern goes to the pass, not into ``hf_overrides``: ``index_topk_freq`` there would make
  vLLM's own model code skip the S indexers before compilation (the pass would then find only
  F layers and say so);
* ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine in this process, so the reports the pass
  leaves in ``fx_indexcache.reports()`` can be printed here.
"""

from __future__ import annotations

import argparse
import logging
import os


def build_compilation_config(freq: int | None, pattern: str | None, graph_partition: bool):
    from vllm.config import CompilationConfig

    from fx_indexcache.vllm_pass import VllmIndexCachePass

    keys = {"index_topk_pattern": pattern} if pattern else {"index_topk_freq": freq}
    graph_pass = VllmIndexCachePass(**keys)
    split = {"use_inductor_graph_partition": True} if graph_partition else {
        "splitting_ops": [], "cudagraph_mode": "FULL_DECODE_ONLY"}
    return graph_pass, CompilationConfig(
        mode=3, inductor_compile_config={"post_grad_custom_post_pass": graph_pass}, **split
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deepseek-ai/DeepSeek-V3.2")
    parser.add_argument("--tp", type=int, default=8, help="tensor-parallel size")
    parser.add_argument("--freq", type=int, default=4, help="index_topk_freq (offset 2: layers 0, 1 are F)")
    parser.add_argument("--pattern", help="F/S string, one per decoder layer (overrides --freq)")
    parser.add_argument("--no-graph-partition", action="store_true",
                        help="splitting_ops=[] and FULL_DECODE_ONLY CUDA graphs instead of graph partition")
    parser.add_argument("--max-model-len", type=int, default=32768)
    parser.add_argument("--dry-run", action="store_true", help="print the configs and the pattern, then exit")
    args = parser.parse_args()

    graph_pass, compilation_config = build_compilation_config(args.freq, args.pattern, not args.no_graph_partition)
    print(f"pass: {graph_pass!r}")
    layers = len(args.pattern) if args.pattern else 61  # DeepSeek-V3.2 has 61 decoder layers
    print(f"pattern for {layers} layers: {graph_pass.config().pattern_for(layers)}")
    if args.dry_run:
        print(f"compilation config: {compilation_config!r}")
        return

    for name in ("VLLM_USE_BREAKABLE_CUDAGRAPH", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        if os.environ.get(name) != "0":
            print(f"warning: {name} is not 0; see this file's docstring")
    logging.getLogger("fx_indexcache").setLevel(logging.INFO)

    from vllm import LLM, SamplingParams

    import fx_indexcache

    llm = LLM(
        model=args.model,
        tensor_parallel_size=args.tp,
        max_model_len=args.max_model_len,
        hf_overrides={"architectures": ["DeepseekV3ForCausalLM"]},
        compilation_config=compilation_config,
    )
    from fx_indexcache.vllm_pass import check_vllm_compiles

    if check_vllm_compiles(llm.llm_engine.vllm_config, graph_pass.config()):
        print("vLLM will not compile this model: the pass cannot run (the warning above gives the native overrides)")
    prompts = ["Summarise the IndexCache paper in one sentence.", "What is a lightning indexer?"]
    for output in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=64)):
        print(repr(output.outputs[0].text))

    found = fx_indexcache.reports()
    if not found:
        print("no IndexCache reports in this process (engine in another process, or nothing compiled)")
    for report in found:
        print(report.format())


if __name__ == "__main__":
    main()
