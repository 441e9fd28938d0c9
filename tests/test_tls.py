"""TLS between lazymig's page server and its daemon: real sockets, real certificates.

Certificates come from a CA made for the run (tests/tls_pki.py, the openssl
command). A lazy migration goes through TLS twice: children that attach() their
memory to the daemon, and a process dumped and restored with the three CLIs.
Clients that must be refused (no certificate, another CA, a revoked one, a name
that is not the server's address, no TLS at all) are refused with a logged
reason while a good client goes on being served; a client refuses a server
whose certificate it cannot trust. ``--tls-no-cn-verify`` lets a wrong name through.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    cli,
    finish,
    free_port,
    layout,
    on_uvloop,
    restore_and_check,
    run_daemon,
    spawn,
    stop,
    wait_ready,
)
from lazydump import page_pattern, write_lazy_dump
from tls_pki import OPENSSL, Pki

from lazymig.dump import LazyDump, SourceFate
from lazymig.dump.server import PageServer
from lazymig.dump.store import ImagesPageStore
from lazymig.errors import AuthenticationError, BrokenResourceError, ConfigurationError
from lazymig.proto.constants import PAGE_SIZE
from lazymig.proto.images import ImagesDir
from lazymig.proto.pageserver import DEFAULT_MAX_PAGES
from lazymig.testing.workload import Workload, expected_page
from lazymig.tls import ServerTls, TlsConfig, name_matches
from lazymig.uffd.source import RemotePageSource

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="no openssl command to make certificates")

DUMP = layout(2, pages=64)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    directory = tmp_path / "images"
    directory.mkdir()
    write_lazy_dump(directory, DUMP)
    return directory


def serve(images: Path, tls: TlsConfig | ssl.SSLContext | None) -> PageServer:
    return PageServer(ImagesPageStore(ImagesDir(images)), address="127.0.0.1", port=0, tls=tls)


async def fetch_everything(source: RemotePageSource,
                           ranges: dict[int, list[tuple[int, int]]] = DUMP,
                           expected: Callable[[int, int], bytes] | None = page_pattern) -> None:
    """Every page of ``ranges`` ({pid: [(vaddr, nr_pages)]}), checked against
    ``expected(pid, vaddr)`` if given, then CLOSE."""
    for pid, runs in ranges.items():
        for vaddr, nr in runs:
            got = 0
            while got < nr:
                # A pagemap entry may be longer than one GET may ask for.
                ask = min(nr - got, DEFAULT_MAX_PAGES)
                chunk = await source.get(pid, vaddr + got * PAGE_SIZE, ask)
                for i in range(chunk.nr_pages if expected is not None else 0):
                    page = vaddr + (got + i) * PAGE_SIZE
                    assert expected is not None
                    assert chunk.data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] == expected(pid, page)
                got += chunk.nr_pages
                chunk.release()
    await source.aclose()


# -- a lazy migration through TLS --------------------------------------------------------------


@pytest.mark.root
@pytest.mark.asyncio
@pytest.mark.parametrize("names", ["checked", "no-cn-verify"])
async def test_attached_children_filled_over_tls(pki: Pki, images: Path, names: str) -> None:
    """Two children attach() their memory; the daemon fills it from the page server over
    two TLS channels. With verify_cn=False on both ends, certificates that name another
    host are accepted (the chain is still checked)."""
    if names == "checked":
        server_tls, client_tls = pki.config(pki.server), pki.config(pki.client)
    else:
        server_tls = pki.config(pki.elsewhere, verify_cn=False)
        client_tls = pki.config(pki.elsewhere, verify_cn=False)
    server = serve(images, server_tls)
    async with asyncio.timeout(60), server:
        serving = asyncio.create_task(server.serve())
        source = await RemotePageSource.connect("127.0.0.1", server.port, channels=2,
                                                tls=client_tls)
        daemon, running = await run_daemon(images, source, expect_tasks=len(DUMP))
        children = [await spawn(daemon.socket_path, pid, vaddr, nr, "touch")
                    for pid, [(vaddr, nr)] in DUMP.items()]
        results = [await finish(child) for child in children]
        report = await running
        assert await serving is True  # every page served, then CLOSE over TLS
    server.store.close()
    assert all(code == 0 for code, _ in results), results
    assert report.ok, report
    assert sum(p.pages_copied for p in report.processes) == sum(
        nr for [(_, nr)] in DUMP.values())
    assert server.stats.refused_connections == 0


@pytest.mark.root
@pytest.mark.asyncio
async def test_lazy_migration_with_the_three_clis_over_tls(pki: Pki, tmp_path: Path,
                                                           c_workload: Path) -> None:
    port = str(free_port())
    loop = on_uvloop()

    def tls(who: str) -> list[str]:
        identity = getattr(pki, who)
        return ["--tls", "--tls-cacert", str(pki.ca), "--tls-cacrl", str(pki.crl),
                "--tls-cert", str(identity.cert), "--tls-key", str(identity.key)]

    with Workload([str(c_workload), "--mib", "16", "--interval-ms", "50"]) as w:
        before = w.next_check()
        with cli("dump", "-t", str(w.pid), "--lazy-pages", "--address", "127.0.0.1",
                 "--port", port, "-D", str(tmp_path), *tls("server"), uvloop=loop) as (dumper, dr):
            assert dr is not None
            await asyncio.to_thread(wait_ready, dr, dumper, "lazymig dump --tls")
            with cli("lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", port,
                     "-D", str(tmp_path), *tls("client"), uvloop=loop) as (daemon, lr):
                assert lr is not None
                await asyncio.to_thread(wait_ready, lr, daemon, "lazymig lazy-pages --tls")
                restored_pid = await restore_and_check(tmp_path, before, loop, daemon, dumper)
            _, dump_log = dumper.communicate(timeout=10)
        assert restored_pid != w.pid
        assert w.proc.wait(timeout=5) == -signal.SIGKILL  # the source is gone
    assert "(v2, TLS)" in dump_log and "transfer complete" in dump_log, dump_log
    assert "without TLS" not in dump_log


@pytest.mark.root
@pytest.mark.asyncio
async def test_page_pipes_are_served_over_tls_without_being_consumed(
        pki: Pki, tmp_path: Path, c_workload: Path) -> None:
    """LazyDump over TLS: the same pages asked three times come back the same each
    time (read from a scratch pipe, never from the page pipe itself), then every
    lazy page goes out and the transfer completes."""
    with Workload([str(c_workload), "--mib", "8", "--interval-ms", "3600000"]) as w:
        async with asyncio.timeout(60), LazyDump(
                w.pid, tmp_path, address="127.0.0.1", port=0, tls=pki.config(pki.server),
                progress_interval=None) as dump:
            serving = asyncio.create_task(dump.serve())
            source = await RemotePageSource.connect("127.0.0.1", dump.port,
                                                    tls=pki.config(pki.client))
            first = w.ready.addr + PAGE_SIZE
            pages = b"".join(expected_page(first + i * PAGE_SIZE, w.ready.seed)
                             for i in range(16))
            for _ in range(3):
                chunk = await source.get(w.pid, first, 16)
                assert (chunk.nr_pages, bytes(chunk.data)) == (16, pages)
                chunk.release()
            images = ImagesDir(tmp_path)
            await fetch_everything(source, {w.pid: [(r.vaddr, r.nr_pages)
                                                    for r in images.lazy_ranges(w.pid)]},
                                   expected=None)
            result = await serving
    assert result.source is SourceFate.KILLED
    assert result.pages_sent == result.lazy_pages + 3 * 16


# -- refusals ----------------------------------------------------------------------------------


def no_certificate(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca)
    return ctx


REFUSED = {
    # client's TLS -> the reason the server logs
    "no certificate": (no_certificate, "peer did not return a certificate"),
    "another CA": (lambda p: p.config(p.stranger), "unable to get local issuer certificate"),
    "revoked": (lambda p: p.config(p.revoked), "certificate revoked"),
    "wrong name": (lambda p: p.config(p.elsewhere),
                   "client certificate is for elsewhere.example, not 127.0.0.1"),
    "no TLS": (None, "TLS handshake failed"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(REFUSED))
async def test_refused_clients_are_logged_and_others_served(
        pki: Pki, images: Path, case: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lazymig")
    make_tls, reason = REFUSED[case]
    server = serve(images, pki.config(pki.server, cacrl=pki.crl))
    async with asyncio.timeout(30), server:
        serving = asyncio.create_task(server.serve())
        good = await RemotePageSource.connect("127.0.0.1", server.port, tls=pki.config(pki.client))
        pid, [(vaddr, _)] = next(iter(DUMP.items()))
        (await good.get(pid, vaddr, 1)).release()
        tls = make_tls(pki) if make_tls is not None else None
        # TLS 1.3 clients learn of the refusal at their first read, not at connect.
        with pytest.raises((AuthenticationError, BrokenResourceError)):
            bad = await RemotePageSource.connect("127.0.0.1", server.port, tls=tls)
            try:
                await bad.get(pid, vaddr, 1)
            finally:
                bad.abort()
        await fetch_everything(good)  # the server keeps serving the good client
        assert await serving is True
    server.store.close()
    assert server.stats.refused_connections == 1
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and reason in refusals[0], caplog.text


SERVER_REFUSED = {
    # server's identity -> what the client says
    "wrong name": ("elsewhere", "IP address mismatch"),
    "another CA": ("stranger", "unable to get local issuer certificate"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(SERVER_REFUSED))
async def test_the_client_refuses_a_server_it_cannot_trust(pki: Pki, images: Path,
                                                           case: str) -> None:
    who, reason = SERVER_REFUSED[case]
    server = serve(images, pki.config(getattr(pki, who), cacert=pki.ca))
    async with asyncio.timeout(30), server:
        serving = asyncio.create_task(server.serve())
        with pytest.raises(AuthenticationError, match=reason):
            await RemotePageSource.connect("127.0.0.1", server.port, tls=pki.config(pki.client))
        await stop(serving)
    server.store.close()


@pytest.mark.asyncio
async def test_no_cn_verify_on_the_server_accepts_another_name(pki: Pki, images: Path) -> None:
    server = serve(images, pki.config(pki.server, verify_cn=False))
    async with asyncio.timeout(30), server:
        serving = asyncio.create_task(server.serve())
        source = await RemotePageSource.connect("127.0.0.1", server.port,
                                                tls=pki.config(pki.elsewhere))
        await fetch_everything(source)
        assert await serving is True
    server.store.close()
    assert server.stats.refused_connections == 0


@pytest.mark.asyncio
async def test_a_plain_ssl_context_is_accepted(pki: Pki, images: Path) -> None:
    """The API takes ready ``ssl.SSLContext`` objects too (used as they are)."""
    server = serve(images, pki.config(pki.server).context(server=True))
    async with asyncio.timeout(30), server:
        serving = asyncio.create_task(server.serve())
        source = await RemotePageSource.connect(
            "127.0.0.1", server.port, tls=pki.config(pki.client).context(server=False))
        await fetch_everything(source)
        assert await serving is True
    server.store.close()


# -- configuration -----------------------------------------------------------------------------


def test_unloadable_files_are_named(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigurationError, match=f"certificate {missing}.*--tls-cert"):
        TlsConfig(cacert=pki.ca, cert=missing, key=pki.client.key).context(server=False)
    with pytest.raises(ConfigurationError, match=f"--tls-cacert {missing}"):
        TlsConfig(cacert=missing, cert=pki.client.cert, key=pki.client.key).context(server=True)
    with pytest.raises(ConfigurationError, match=f"--tls-cacrl {missing}"):
        TlsConfig(cacert=pki.ca, cacrl=missing, cert=pki.client.cert,
                  key=pki.client.key).context(server=True)
    with pytest.raises(ConfigurationError, match="--tls-key"):  # a key of another certificate
        TlsConfig(cacert=pki.ca, cert=pki.client.cert, key=pki.server.key).context(server=True)


def test_client_names_are_checked_against_the_listen_address(pki: Pki) -> None:
    """As CRIU: the address the server was given, none for a wildcard address."""
    assert ServerTls.build(pki.config(pki.server), "127.0.0.1").client_name == "127.0.0.1"
    assert ServerTls.build(pki.config(pki.server), "0.0.0.0").client_name is None
    assert ServerTls.build(pki.config(pki.server), "::").client_name is None
    assert ServerTls.build(pki.config(pki.server, verify_cn=False), "10.0.0.1").client_name \
        is None


def test_name_matching() -> None:
    san = {"subject": ((("commonName", "ignored.example"),),),
           "subjectAltName": (("DNS", "*.pages.example"), ("IP Address", "10.1.2.3"),
                              ("IP Address", "2001:DB8:0:0:0:0:0:1\n"))}
    assert name_matches(san, "src.pages.example")
    assert name_matches(san, "SRC.Pages.Example.")
    assert not name_matches(san, "pages.example")
    assert not name_matches(san, "a.b.pages.example")
    assert not name_matches(san, "ignored.example")  # the CN counts only without DNS names
    assert name_matches(san, "10.1.2.3")
    assert name_matches(san, "2001:db8::1")
    assert not name_matches(san, "10.1.2.4")
    cn_only = {"subject": ((("commonName", "host.example"),),)}
    assert name_matches(cn_only, "host.example")
    assert not name_matches(cn_only, "127.0.0.1")  # IP addresses only from subjectAltName


def test_a_server_without_tls_warns_when_not_on_loopback(
        pki: Pki, images: Path, caplog: pytest.LogCaptureFixture) -> None:
    for address, tls, warned in [("0.0.0.0", None, True), ("127.0.0.1", None, False),
                                 ("0.0.0.0", pki.config(pki.server), False)]:
        caplog.clear()
        store = ImagesPageStore(ImagesDir(images))
        server = PageServer(store, address=address, port=0, tls=tls)
        with caplog.at_level(logging.WARNING, logger="lazymig"):
            server.listen()
        server.close()
        store.close()
        assert ("without TLS" in caplog.text) is warned, (address, tls, caplog.text)
