"""Stage 2, rewrite: what IndexCache does to a graph.

Graph surgery only: ``share`` decides per layer (compute / share / leave) and rewires S layers to
their source's indices; ``cache_ledger`` is one model's key-cache-write choice per layer across its
graphs; ``indices_io`` feeds a layer's indices in from outside or hands them out; ``regional`` handles
a ``nested_compile_region`` body serving several layers. Depends on ``detection``. The run-time
sharing across graphs is ``crossgraph``.
"""
