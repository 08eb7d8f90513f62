"""Exception types. Each message says what went wrong and what the user can do about it."""


class EngineError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(EngineError, ValueError):
    """config.json is missing, unreadable, or describes a model we cannot run."""


class CheckpointError(EngineError, ValueError):
    """A checkpoint file is missing, malformed, or does not match its config."""


class ImageError(EngineError, ValueError):
    """An input image cannot be read or converted."""


class TokenizerError(EngineError, ValueError):
    """tokenizer.model is missing or lacks the tokens PaliGemma needs."""
