"""Stage 2, rewrite: what IndexCache does to a graph.

``share`` decides per layer (compute / share / leave) and rewires S layers to their F layer's
indices; ``cache_ledger`` keeps one key-cache-write choice per layer across graphs; ``cross_graph``
and ``cross_graph_build`` share across graph breaks at run time; ``regional`` handles a
``nested_compile_region`` body serving several layers. Depends on ``detection``.
"""
