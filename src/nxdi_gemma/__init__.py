"""Gemma 2 / 3 / 4 text decoders for NxD Inference, with a CPU reference runtime exact to Hugging Face."""

__version__ = "0.1.0"
