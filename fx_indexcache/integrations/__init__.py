"""How users reach the pass: Inductor's ``CustomGraphPass`` (``graph_pass``, which runs detection ->
rewrite -> fusion -> report), the ``torch.compile`` backends (``backend``), ``torch.export`` programs
(``export``), vLLM (``vllm``, the only module that imports vLLM) and transformers' generate()
(``transformers_compile``: which compile is decode-only; ``transformers_cache``: a static cache allocated before
the first compiled call).
"""
