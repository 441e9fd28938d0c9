"""Arguments of the orchestrator API, checked where they come in.

A wrong argument is a :class:`~lazymig.errors.ConfigurationError` naming the call
and what is wrong with it, raised when the handle is made: not an
``OverflowError`` from a socket call or an unpacking ``ValueError`` deep inside.
"""

from __future__ import annotations

import os
from pathlib import Path

from lazymig.errors import ConfigurationError

__all__ = ["PageServerAddress", "check_images_dir", "check_port", "page_server_address"]

PageServerAddress = tuple[str, int] | str
"""``(host, port)`` (such as a page server's ``address``), or ``"host:port"``
(``"[v6 address]:port"`` for IPv6)."""


def check_port(port: object, call: str) -> int:
    """``port`` if it is a TCP port number (0 for any free one)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigurationError(f"{call}: port {port!r} is not a TCP port number (0 to 65535)")
    return port


def page_server_address(value: PageServerAddress, call: str) -> tuple[str, int]:
    """``(host, port)`` from a pair or a ``"host:port"`` string."""
    if isinstance(value, str):
        host, sep, digits = value.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not digits.isdigit():
            raise ConfigurationError(
                f"{call}: page_server {value!r} is not \"host:port\" (\"[address]:port\" for "
                "IPv6) nor a (host, port) pair")
        pair: tuple[object, ...] = (host, int(digits))
    elif isinstance(value, tuple) and len(value) == 2:
        pair = value
    else:
        raise ConfigurationError(f"{call}: page_server {value!r} is neither a (host, port) "
                                 "pair nor a \"host:port\" string")
    name, port = pair
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{call}: page_server host {name!r} is not a host name or "
                                 "address")
    return name, check_port(port, call)


def check_images_dir(path: str | os.PathLike[str], call: str) -> Path:
    """``path`` as a Path if it is an existing directory."""
    images = Path(path)
    if images.exists() and not images.is_dir():
        raise ConfigurationError(f"{call}: images_dir {images} is not a directory")
    if not images.is_dir():
        raise ConfigurationError(f"{call}: images_dir {images} does not exist")
    return images
