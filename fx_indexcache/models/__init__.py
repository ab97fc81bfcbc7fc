"""Models the tools run on: the built-in DSA reference model (``reference``) and tiny random
transformers DSA models (``tiny_transformers``, needs transformers). Nothing here imports the pass."""
