"""The EmbSum model and its training: tensors and checkpoints, no storage."""

__version__ = "0.1.0"
