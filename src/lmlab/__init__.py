"""lmlab: tracked experiments on the insides and behaviour of language models."""

__version__ = "0.2.0"
