"""Errors raised for bad user input. Each message says what was wrong, where, and what to do."""


class GemmaError(Exception):
    """Base class: the CLI prints these as one line and exits 2 instead of showing a traceback."""


class ConfigError(GemmaError):
    """config.json cannot be turned into a plan we can run exactly."""


class CheckpointError(GemmaError):
    """The weights on disk do not match the plan (missing, extra, mis-shaped tensors, unsafe format)."""


class InputError(GemmaError):
    """A prompt or a generation request that cannot be served (empty, too long, bad token ids)."""
