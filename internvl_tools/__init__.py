"""internvl-tools: stream-convert, shard and quantize InternVL checkpoints with bounded memory."""

__version__ = "0.1.0"
