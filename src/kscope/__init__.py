"""kscope, the Knowledge Microscope: where does a language model keep a fact, and how to remove it."""

__version__ = "0.1.0"
