"""User-facing errors: one sentence that names the file, row, field or setting and what to do.

The CLI prints these without a traceback. Anything else that escapes is a bug in kdflow.
"""


class KDFlowError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""


class ConfigError(KDFlowError):
    """A setting is unknown, mistyped or out of range."""


class DataError(KDFlowError):
    """A data file or row cannot be used."""


class ModelError(KDFlowError):
    """A model or tokenizer cannot be loaded or does not fit the run."""


class AlignmentError(KDFlowError):
    """Two tokenizers cannot be aligned as configured (cross-tokenizer distillation)."""
