"""Stage 2b, across graphs: IndexCache between graphs of one model, decided per call on the host.

``plan`` says what a graph exchanges with the model's other graphs and why not; ``numbered`` finds the
leading S layers and the publishing F layer of a graph whose layers are numbered; ``build`` compiles the
variants and returns the per-call wrapper; ``runtime`` holds the wrappers, the model's layer map and the
timeline that proves, per call, that published indices belong to this forward call. Depends on
``detection`` and ``rewrite``; its state is owned by an ``IndexCacheSession``.
"""
