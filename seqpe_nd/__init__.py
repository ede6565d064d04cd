"""seqpe-nd: SeqPE and the position encodings it competes with, for positions of any dimensionality."""

__version__ = "0.1.0"
