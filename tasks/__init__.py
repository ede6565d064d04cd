"""Backbone adapters, data pipelines, training/evaluation loops and the ``seqpe-nd`` CLI."""
