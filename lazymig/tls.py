"""TLS for page-server connections, with CRIU's options and their meanings.

Both ends present a certificate and check the other's (``criu --tls``):

* trust: only ``--tls-cacert`` when given; otherwise the system's trusted CAs
  plus ``/etc/pki/CA/cacert.pem`` if it exists;
* revocation: ``--tls-cacrl`` (which must then be readable), otherwise
  ``/etc/pki/CA/cacrl.pem`` if it exists;
* our identity: ``--tls-cert`` and ``--tls-key`` (``/etc/pki/criu/cert.pem``
  and ``/etc/pki/criu/private/key.pem`` by default);
* names: as CRIU (``tls_x509_verify_peer_cert``), each side checks the peer's
  certificate against *the address it was given*: the daemon checks that the
  page server's certificate names the address it connects to; the page
  server checks that the client's certificate names the address it was told
  to listen on (no name to check when it listens on a wildcard address, as
  CRIU without ``--address``). ``--tls-no-cn-verify`` turns both checks off;
  the chain is still verified.

:class:`TlsConfig` holds those options and builds the :class:`ssl.SSLContext`
of either side; an API caller may pass its own context instead (used as is:
a server context then checks no name, Python's server side has no such check).

:class:`TlsSocket` drives one accepted connection's TLS session on a raw
non-blocking socket from asyncio (the page server owns its sockets, see
:mod:`lazymig.dump.server`). Python 3.11's ``ssl`` cannot hand the session to
kernel TLS (no ``OP_ENABLE_KTLS``, no ``SSL_sendfile``), so page bytes are
encrypted in user space.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

from lazymig._aio import wait_fd
from lazymig.errors import AuthenticationError, ConfigurationError
from lazymig.proto import constants

__all__ = [
    "DEFAULT_CACERT",
    "DEFAULT_CACRL",
    "DEFAULT_CERT",
    "DEFAULT_KEY",
    "ServerTls",
    "TlsConfig",
    "TlsOption",
    "TlsSocket",
    "client_context",
]

log = logging.getLogger(__name__)

DEFAULT_CACERT = Path(constants.DEFAULT_CACERT)
DEFAULT_CACRL = Path(constants.DEFAULT_CACRL)
DEFAULT_CERT = Path(constants.DEFAULT_CERT)
DEFAULT_KEY = Path(constants.DEFAULT_KEY)
"""CRIU's default TLS files (criu/tls.c)."""

_T = TypeVar("_T")
StrPath = str | os.PathLike[str]
Cert = Mapping[str, object]
"""A peer certificate as ``SSLSocket.getpeercert()`` decodes it."""
_Pairs = tuple[tuple[str, str], ...]

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a client gets to complete the handshake before the server drops it."""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """CRIU's ``--tls-*`` options; builds the SSL context of either end.

    Args:
        cacert: the only CA to trust (``--tls-cacert``); None: the system's CAs
            plus :data:`DEFAULT_CACERT` if present.
        cacrl: revoked certificates, PEM (``--tls-cacrl``); None:
            :data:`DEFAULT_CACRL` if present.
        cert: our certificate, PEM (``--tls-cert``).
        key: its private key, PEM (``--tls-key``).
        verify_cn: check the peer certificate's name (``--tls-no-cn-verify``
            sets it False).
    """

    cacert: StrPath | None = None
    cacrl: StrPath | None = None
    cert: StrPath = DEFAULT_CERT
    key: StrPath = DEFAULT_KEY
    verify_cn: bool = True

    def context(self, *, server: bool) -> ssl.SSLContext:
        """A context for the page server (``server=True``) or its client.

        Raises :class:`~lazymig.errors.ConfigurationError` naming the file that
        could not be loaded.
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED  # the server requires a client certificate
        ctx.check_hostname = self.verify_cn and not server  # the server checks by hand
        if self.cacert is not None:
            _load(ctx.load_verify_locations, "--tls-cacert", self.cacert)
        else:
            ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH)
            if DEFAULT_CACERT.exists():
                _load(ctx.load_verify_locations, "the default CA", DEFAULT_CACERT)
        crl = self.cacrl if self.cacrl is not None else (
            DEFAULT_CACRL if DEFAULT_CACRL.exists() else None)
        if crl is not None:
            _load(ctx.load_verify_locations, "--tls-cacrl", crl)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"cannot load the TLS certificate {os.fspath(self.cert)} with key "
                f"{os.fspath(self.key)}: {_reason(exc)} (see --tls-cert/--tls-key)") from exc
        return ctx


TlsOption = TlsConfig | ssl.SSLContext
"""What the API takes for TLS: CRIU-style options, or a ready context."""


def _load(load: Callable[[str], None], what: str, path: StrPath) -> None:
    try:
        load(os.fspath(path))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load {what} {os.fspath(path)}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return str(exc.verify_message)
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _wildcard(address: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(address).is_unspecified
    return address == ""


def client_context(tls: TlsOption) -> ssl.SSLContext:
    """The daemon's context (it checks the server's name against the address it dials)."""
    return tls.context(server=False) if isinstance(tls, TlsConfig) else tls


@dataclass(frozen=True, slots=True)
class ServerTls:
    """The page server's side: its context and the name a client certificate must carry."""

    context: ssl.SSLContext
    client_name: str | None

    @classmethod
    def build(cls, tls: TlsOption | ServerTls, address: str) -> ServerTls:
        """For a server listening on ``address`` (CRIU checks client names against it)."""
        if isinstance(tls, ServerTls):
            return tls
        if isinstance(tls, TlsConfig):
            name = address if tls.verify_cn and not _wildcard(address) else None
            return cls(tls.context(server=True), name)
        return cls(tls, None)


def cert_names(cert: Cert) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) a certificate (``getpeercert()``) is valid for.

    The subject's CN counts as a DNS name only when there are no DNS names in
    subjectAltName (RFC 6125, as GnuTLS and OpenSSL check).
    """
    dns: list[str] = []
    ips: list[str] = []
    for kind, value in cast(_Pairs, cert.get("subjectAltName", ())):
        if kind == "DNS":
            dns.append(str(value))
        elif kind == "IP Address":
            ips.append(str(value).strip())
    if not dns:
        for rdn in cast(tuple[_Pairs, ...], cert.get("subject", ())):
            dns.extend(str(v) for k, v in rdn if k == "commonName")
    return dns, ips


def name_matches(cert: Cert, name: str) -> bool:
    """Does the certificate name ``name`` (an IP address or a host name)?"""
    dns, ips = cert_names(cert)
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return any(_dns_matches(pattern, name) for pattern in dns)
    return any(_ip_equal(candidate, ip) for candidate in ips)


def _ip_equal(candidate: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(candidate) == ip
    except ValueError:
        return False


def _dns_matches(pattern: str, name: str) -> bool:
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern.startswith("*.") and "." in name:  # one wildcard, the whole leftmost label
        return name.split(".", 1)[1] == pattern[2:]
    return pattern == name


class TlsSocket:
    """The server end of one TLS session on a raw non-blocking socket, driven from asyncio.

    Owns the socket after :meth:`accept`; :meth:`close` releases it.
    """

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock
        self.fd = sock.fileno()

    @classmethod
    async def accept(cls, sock: socket.socket, side: ServerTls,
                     handshake_timeout: float = HANDSHAKE_TIMEOUT) -> TlsSocket:
        """Handshake as the server and check the client's certificate.

        Takes ``sock`` over (it is detached); raises
        :class:`~lazymig.errors.AuthenticationError` saying why a client was refused.
        """
        ssock = side.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        tls = cls(ssock)
        try:
            try:
                async with asyncio.timeout(handshake_timeout):
                    await tls._retry(ssock.do_handshake)
            except TimeoutError:
                raise AuthenticationError(
                    f"no TLS handshake within {handshake_timeout:g} s") from None
            except ssl.SSLCertVerificationError as exc:
                raise AuthenticationError(
                    f"client certificate refused: {exc.verify_message}") from exc
            except ssl.SSLError as exc:
                raise AuthenticationError(f"TLS handshake failed: {_reason(exc)}") from exc
            cert = ssock.getpeercert()
            if side.client_name is not None and not name_matches(cert or {}, side.client_name):
                dns, ips = cert_names(cert or {})
                raise AuthenticationError(
                    f"client certificate is for {', '.join(dns + ips) or 'no name'}, not "
                    f"{side.client_name} (the address this server listens on; "
                    "--tls-no-cn-verify skips this check)")
        except BaseException:
            tls.close()
            raise
        log.debug("TLS session with %s: %s, %s", _subject(cert), ssock.version(),
                  (ssock.cipher() or ("?",))[0])
        return tls

    async def _retry(self, attempt: Callable[[], _T]) -> _T:
        """Call ``attempt`` until OpenSSL stops asking to wait for the socket."""
        while True:
            try:
                return attempt()
            except ssl.SSLWantReadError:
                await wait_fd(self.fd)
            except ssl.SSLWantWriteError:
                await wait_fd(self.fd, writable=True)

    async def recv_into(self, buf: bytearray) -> int:
        """Decrypted bytes into ``buf``; 0 at the end of the session."""
        return await self._retry(lambda: self._sock.recv_into(buf))

    async def sendall(self, data: bytes | memoryview) -> None:
        """Encrypt and send all of ``data``."""
        view = memoryview(data)
        while view:
            # A retried SSL_write must see the same bytes: the view only moves on success.
            sent = await self._retry(functools.partial(self._sock.send, view))
            view = view[sent:]

    def close(self, *, clean: bool = False) -> None:
        """Close the connection; ``clean`` first answers the peer's close_notify with ours."""
        if self.fd < 0:
            return
        if clean:
            with contextlib.suppress(ssl.SSLError, OSError):
                self._sock.unwrap()
        self._sock.close()
        self.fd = -1


def _subject(cert: Cert | None) -> str:
    if not cert:
        return "?"
    return ",".join(f"{k}={v}" for rdn in cast(tuple[_Pairs, ...], cert.get("subject", ()))
                    for k, v in rdn)
