"""Every error tilestack raises on purpose.

Messages name the argument, what was given and what was expected. Errors found while tracing a kernel
also name the user's own source line (``file.py:12``), never a line inside tilestack.
"""

from __future__ import annotations


class TilestackError(Exception):
    """Base of every tilestack error."""


class TraceError(TilestackError):
    """A kernel is wrong as written: found while tracing it, before anything runs.

    ``where`` is the user's ``file:line`` of the offending op, put in front of the message.
    """

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class TileShapeError(TraceError):
    """Tile shapes that do not fit an op (including mma inner dimensions and loop-carried tiles)."""


class TileDTypeError(TraceError):
    """Tile dtypes that do not fit an op."""


class MemorySpaceError(TraceError):
    """An op given a tile in a memory space it cannot use (e.g. ``exp`` of a shared tile)."""


class TunableError(TraceError):
    """A tunable constant outside its declared domain."""


class LaunchError(TilestackError, ValueError):
    """Bad arguments at launch, found before any work starts."""


class LaunchTypeError(LaunchError, TypeError):
    """A launch argument of the wrong kind (a tensor where names are asked for): caught as a LaunchError and as the
    TypeError Python code expects of an argument of the wrong type."""


class BackendError(TilestackError):
    """A backend cannot run here (no GPU, no Triton) or cannot lower an op."""


class DeviceError(TilestackError, ValueError):
    """An unknown device or a device property that cannot be read."""


class FederatedError(TilestackError, ValueError):
    """A federated run that cannot go on as asked (a checkpoint from another run, a strategy that cannot aggregate)."""


class TorchArgumentError(LaunchError, RuntimeError):
    """Bad arguments to a drop-in for a torch function (``tilestack.scaled_dot_product_attention``) where torch
    raises a RuntimeError (or should): caught as a LaunchError and as the RuntimeError code written for torch's
    function expects."""
