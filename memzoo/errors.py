"""Exceptions memzoo raises for bad input. All subclass ``ValueError`` so callers that
catch ``ValueError`` keep working; each message says what was wrong and what is valid."""


class MemzooError(ValueError):
    """Base class of memzoo's input errors."""


class UnknownNameError(MemzooError):
    """An unknown variant, task, backend or field name."""


class InputError(MemzooError):
    """A tensor of the wrong type, dtype, shape, device or value range."""


class StateError(MemzooError):
    """A state that does not belong to this model (variant, config, batch, device, dtype)."""
