"""sinkcheck: an independent C++ auditor of attention-sink divergence (see `sinkcheck --help`)."""
from ._core import CheckError, Model, read_metadata

__all__ = ["CheckError", "Model", "read_metadata"]
