"""seqpe-nd: SeqPE and the position encodings it competes with, for positions of any dimensionality."""

__version__ = "0.1.0"

# The encoder, its regularizers and the PositionEncoding factory, imported on first use so `import seqpe_nd.positions` stays light.
_LAZY = {
    "SeqPE": "seqpe_nd.encoder",
    "save_encoder": "seqpe_nd.encoder",
    "load_encoder": "seqpe_nd.encoder",
    "SeqPERegularizer": "seqpe_nd.regularizers",
    "RegularizedStep": "seqpe_nd.regularizers",
    "RegularizerDraws": "seqpe_nd.regularizers",
    "PositionEncoding": "seqpe_nd.encodings",
    "PEState": "seqpe_nd.encodings",
    "KVCache": "seqpe_nd.encodings",
    "build_position_encoding": "seqpe_nd.encodings",
    "load_pe_config": "seqpe_nd.encodings",
    "PESpec": "seqpe_nd.encodings",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'seqpe_nd' has no attribute {name!r}")
