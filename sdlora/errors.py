"""sdlora's exceptions: each carries one line that says what to fix; front ends show it as it is."""


class SdloraError(Exception):
    """Base class: an error the user can fix, with a one-line message."""


class ConfigError(SdloraError):
    """A bad setting, caught before any model loads."""


class DataError(SdloraError):
    """A dataset problem (empty folder, no readable image)."""


class ModelError(SdloraError):
    """A base model that cannot be found, loaded or recognised."""


class TrainingError(SdloraError):
    """Training went wrong (non-finite loss, LoRA that stayed zero, no layer matched)."""


class LoraFileError(SdloraError):
    """A LoRA file that is malformed or does not fit the model."""


class WriteError(SdloraError):
    """A file could not be written (full disk, no permission, a folder in the way)."""
