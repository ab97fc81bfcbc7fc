"""Stage 4, report: what the pass did, per graph (``graph_report``) and per layer call at run time (``sharing``)."""
