"""Stage 3, fusion: making the F layers fast.

``substitute`` proves an F layer's score subgraph is the lightning-indexer score and swaps in the
fused op; ``kernels`` holds the Triton logits and top-k (imported lazily, so no GPU is needed to import).
Depends on ``detection``.
"""
