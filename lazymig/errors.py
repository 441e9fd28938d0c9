"""The exception tree of lazymig: every error the library raises derives from
:class:`LazyMigError`.

The branches follow the style anchors:

* protocol errors (h11): :class:`LocalProtocolError` when *we* were asked to
  produce something the protocol forbids, :class:`RemoteProtocolError` when the
  *peer* sent it. Both name the offending field.
* resource errors (trio): :class:`ClosedResourceError` when the caller closed
  the object it is still using, :class:`BrokenResourceError` when the peer or
  the environment broke it, :class:`BusyResourceError` for two concurrent users
  of one single-user object.
* :class:`LazyMigOSError` carries ``errno`` (and a pid where one applies), so
  callers can tell "retry" from "the process is gone" without parsing text.
* :class:`ImageError` names the image file and the byte offset of the damage.
* :class:`ConfigurationError` is caller misuse and is also a ``ValueError``.
* :class:`AuthenticationError`: a TLS peer's certificate was refused, or ours.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "AuthenticationError",
    "BrokenResourceError",
    "BusyResourceError",
    "ClosedResourceError",
    "ConfigurationError",
    "ImageError",
    "LazyMigError",
    "LazyMigOSError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
]


class LazyMigError(Exception):
    """Root of every exception raised by lazymig."""


class ConfigurationError(LazyMigError, ValueError):
    """The caller asked for something that cannot work (bad option, bad range)."""


class ProtocolError(LazyMigError):
    """A message broke the page-server or handover protocol.

    Abstract: raise :class:`LocalProtocolError` or :class:`RemoteProtocolError`.
    ``field`` names the offending field when one can be named.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError, not ProtocolError")
        super().__init__(message)
        self.field = field


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class ImageError(LazyMigError, ValueError):
    """An image file is truncated, corrupt or of the wrong kind."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None,
                 offset: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{os.fspath(path)}"
            if offset is not None:
                where += f" at offset {offset}"
            where += ": "
        super().__init__(where + message)
        self.path = None if path is None else os.fspath(path)
        self.offset = offset


class ClosedResourceError(LazyMigError):
    """The object was closed by its owner and cannot be used any more."""


class BrokenResourceError(LazyMigError):
    """The peer or the environment broke the resource (connection lost, process gone)."""


class AuthenticationError(LazyMigError):
    """A TLS peer was refused (or refused us): no certificate, an untrusted or revoked
    one, or one issued for another name. The message says which."""


class BusyResourceError(LazyMigError):
    """Two tasks tried to use a single-user resource at once."""


class LazyMigOSError(LazyMigError, OSError):
    """An OS call failed; ``errno`` says why, ``pid`` says for which process (if any)."""

    def __init__(self, err: int, what: str, *, pid: int | None = None) -> None:
        detail = f"{what}: {os.strerror(err)} ({_errno.errorcode.get(err, err)})"
        if pid is not None:
            detail += f" [pid {pid}]"
        super().__init__(err, detail)
        self.pid = pid

    def __str__(self) -> str:
        return str(self.strerror)


class UnsupportedTargetError(LazyMigError):
    """The target has something lazymig cannot migrate; ``reasons`` lists what.

    Raised before the target is touched (or, if it changed in between, right
    after seizing it, and then it is released again).
    """

    def __init__(self, pid: int, reasons: list[str], hint: str = "") -> None:
        super().__init__(f"cannot migrate process {pid}: " + "; ".join(reasons)
                         + (f". {hint}" if hint else ""))
        self.pid = pid
        self.reasons = reasons
        self.hint = hint
        """What to do instead ("" if nothing to say)."""
