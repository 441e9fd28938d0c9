"""Two test hosts on one machine: loopback, or two network namespaces joined by a veth pair.

A :class:`HostPair` says where the source and the destination of a migration
run and which address the source's page server listens on. Commands are run
"on" a host through :meth:`Host.command` (``ip netns exec NS`` for a
namespace, nothing for loopback)::

    from lazymig.testing.netns import HostPair, two_namespaces

    with two_namespaces() as hosts:          # needs root and iproute2
        argv = hosts.source.command([sys.executable, "-m", "lazymig", "page-server", ...])
        ...
        assert hosts.bytes_sent() > 0        # the pages went through the veth pair

    hosts = HostPair.loopback()              # same code, one namespace, 127.0.0.1

A process keeps the namespace it was started in; ptrace works across network
namespaces, so only the sockets of the page server and the daemon care.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from lazymig.errors import ConfigurationError, LazyMigError
from lazymig.linux.procfs import ns_inode

__all__ = ["Host", "HostPair", "NamespaceError", "two_namespaces"]

log = logging.getLogger(__name__)


class NamespaceError(LazyMigError):
    """A network namespace or its link could not be set up (not root? no ``ip``?)."""


def _ip() -> str:
    ip = shutil.which("ip")
    if ip is None:
        raise NamespaceError("no 'ip' command on PATH: install iproute2")
    return ip


def _run_ip(*args: str) -> str:
    try:
        done = subprocess.run([_ip(), *args], check=True, capture_output=True, text=True,
                              timeout=10)
    except subprocess.CalledProcessError as exc:
        raise NamespaceError(f"ip {' '.join(args)} failed: {exc.stderr.strip()}") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NamespaceError(f"ip {' '.join(args)} failed: {exc}") from exc
    return done.stdout.strip()


@dataclasses.dataclass(frozen=True)
class Host:
    """One side: a network namespace (``netns``) or this one (None), and its address."""

    address: str
    netns: str | None = None

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run on this host (``ip netns exec`` execs it: the pid stays argv's)."""
        if self.netns is None:
            return list(argv)
        return [_ip(), "netns", "exec", self.netns, *argv]

    def owns(self, pid: int) -> bool:
        """True if process ``pid`` runs in this host's network namespace."""
        mine = (Path(f"/run/netns/{self.netns}").stat().st_ino if self.netns
                else ns_inode(os.getpid(), "net"))
        return ns_inode(pid, "net") == mine


@dataclasses.dataclass(frozen=True)
class HostPair:
    """The source and destination hosts of a migration; see :func:`two_namespaces`."""

    source: Host
    destination: Host
    link: str | None = None
    """The source namespace's end of the veth pair (None on loopback)."""

    @classmethod
    def loopback(cls) -> HostPair:
        """Both sides in this network namespace, the page server on 127.0.0.1."""
        return cls(Host("127.0.0.1"), Host("127.0.0.1"))

    @property
    def kind(self) -> str:
        """``"loopback"`` or ``"netns"``."""
        return "loopback" if self.link is None else "netns"

    def set_link(self, up: bool) -> None:
        """Take the veth pair down (a dead link: no reset reaches either end) or up again.

        Blocking for a few milliseconds (it runs ``ip``): call it with
        ``asyncio.to_thread`` in async code.

        Raises:
            ConfigurationError: on loopback, where there is no link of its own.
        """
        link, ns = self._link()
        _run_ip("-n", ns, "link", "set", link, "up" if up else "down")

    def bytes_sent(self) -> int:
        """Bytes the source has sent over the link so far (its veth end's tx counter).

        Raises:
            ConfigurationError: on loopback, where there is no link of its own.
        """
        link, ns = self._link()
        return int(_run_ip("netns", "exec", ns, "cat",
                           f"/sys/class/net/{link}/statistics/tx_bytes"))

    def _link(self) -> tuple[str, str]:
        if self.link is None or self.source.netns is None:
            raise ConfigurationError("loopback has no link of its own: use two_namespaces()")
        return self.link, self.source.netns


@contextlib.contextmanager
def two_namespaces(prefix: str = "lazymig") -> Iterator[HostPair]:
    """Two fresh network namespaces joined by a veth pair, deleted on exit.

    The source gets 10.231.X.1/30 and the destination 10.231.X.2/30 (X
    random), ``lo`` is up in both; nothing is added to this namespace. Every
    process still running in them keeps them alive until it exits, but their
    names and the link go at once.

    Raises:
        NamespaceError: a namespace could not be made (not root, no iproute2);
            what was made is deleted.
    """
    tag = f"{os.getpid()}-{secrets.token_hex(3)}"
    names = (f"{prefix}-src-{tag}", f"{prefix}-dst-{tag}")
    net = f"10.231.{secrets.randbelow(256)}"
    src_if, dst_if = f"lmS{tag[-6:]}", f"lmD{tag[-6:]}"
    made: list[str] = []
    try:
        for ns in names:
            _run_ip("netns", "add", ns)
            made.append(ns)
        src, dst = names
        # Created in the source namespace, one end moved: nothing in this one.
        _run_ip("-n", src, "link", "add", src_if, "type", "veth", "peer", "name", dst_if,
                "netns", dst)
        for ns, ifname, addr in ((src, src_if, f"{net}.1"), (dst, dst_if, f"{net}.2")):
            _run_ip("-n", ns, "addr", "add", f"{addr}/30", "dev", ifname)
            _run_ip("-n", ns, "link", "set", ifname, "up")
            _run_ip("-n", ns, "link", "set", "lo", "up")
        log.debug("namespaces %s and %s joined by %s/%s", src, dst, src_if, dst_if)
        yield HostPair(Host(f"{net}.1", src), Host(f"{net}.2", dst), src_if)
    finally:
        for ns in made:
            subprocess.run([_ip(), "netns", "del", ns], check=False, capture_output=True,
                           timeout=10)
