"""The command line (``cli``, ``demo``) and the pattern tools: ``probe`` (records every layer's top-k),
``calibration`` (the model and batches they run on), ``overlap`` and ``pattern_search``."""
