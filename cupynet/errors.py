"""User-facing errors of cupynet.

Every problem caused by the user's input (flags, data files, model dir, checkpoints, devices) is raised
as a `CupynetError` subclass whose message is one line that names the problem. `python -m cupynet.train`
catches these, prints `error: <message>` and exits with status 2, without a traceback. Anything else that
escapes is a bug in cupynet and keeps its traceback.
"""


class CupynetError(Exception):
    """A problem with the user's input; the message is a complete one-line explanation."""


class ConfigError(CupynetError):
    """A flag or a combination of flags is invalid."""


class DataError(CupynetError):
    """The dataset is missing, truncated, corrupt or not what CIFAR-10 files contain."""


class CheckpointError(CupynetError):
    """The model dir cannot be written, or a checkpoint cannot be read or does not fit the model."""


class DeviceError(CupynetError):
    """A requested device or backend is not available."""


class TrainingDiverged(CupynetError):
    """The loss, or the weights, stopped being finite numbers (NaN or infinity): too high a learning rate, say."""
