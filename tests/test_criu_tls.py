"""lazymig and real CRIU 4.1.1 (built with GnuTLS) on one TLS session, both directions.

* ``criu lazy-pages --tls`` (and ``criu restore --lazy-pages``) pull a criu dump's
  pages from ``lazymig page-server --tls``: the restored process runs on with
  its memory intact and lazymig's server logs a complete transfer.
* ``lazymig lazy-pages --tls`` fills the tree ``criu restore --lazy-pages``
  restores from ``criu dump --lazy-pages --tls``, which then exits 0 and kills
  the source.

Both ends check each other's certificate and name (127.0.0.1, as CRIU checks the
peer against the address it was given), from a CA made for the test. The
certificates live in the chroot so that criu can read them. No wire tap here:
the stream is encrypted (test_criu_interop checks the protocol in the clear).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from criu_peer import (
    CRIU,
    LOOPS,
    ChrootDir,
    CriuError,
    Workload,
    check_restored_ticks,
    chroot_argv,
    dump_workload,
    failure_context,
    kill_restored,
    lazy_pages_in,
    log_errors,
    restore_with_lazymig_daemon,
    restored_from_lazymig_page_server,
    start_lazy_dump,
    stop,
)
from tls_pki import OPENSSL, Identity, Pki, make_pki

from lazymig.proto.images import ImagesDir

pytestmark = [pytest.mark.root, pytest.mark.criu,
              pytest.mark.skipif(OPENSSL is None, reason="no openssl command to make certificates")]


def criu_has_tls() -> str | None:
    """Why the chroot's criu cannot do TLS (None when it can): it must offer --tls
    and be linked with GnuTLS (CRIU builds TLS only with CONFIG_GNUTLS)."""
    if not CRIU.exists():
        return f"{CRIU} is missing"
    helptext = subprocess.run(chroot_argv("criu", "--help"), capture_output=True, text=True,
                              timeout=30, check=False).stdout
    if "--tls" not in helptext:
        return "the chroot's criu has no --tls option (built without GnuTLS)"
    libs = subprocess.run(chroot_argv("ldd", "/usr/sbin/criu"), capture_output=True, text=True,
                          timeout=30, check=False).stdout
    if "libgnutls" not in libs:
        return "the chroot's criu is not linked with libgnutls"
    return None


@pytest.fixture(scope="module")
def criu_tls(criu_root: None) -> None:
    if (problem := criu_has_tls()) is not None:
        pytest.skip(f"CRIU TLS interop impossible: {problem}")


def pki_in(d: ChrootDir) -> Pki:
    return make_pki(d.host / "pki")


def criu_tls_args(d: ChrootDir, pki: Pki, who: Identity) -> list[str]:
    """criu's TLS options, with the paths as criu sees them inside the chroot."""
    def inner(path: Path) -> str:
        return d.inside(str(path.relative_to(d.host)))

    return ["--tls", "--tls-cacert", inner(pki.ca), "--tls-cert", inner(who.cert),
            "--tls-key", inner(who.key)]


def lazymig_tls_args(pki: Pki, who: Identity) -> list[str]:
    return ["--tls", "--tls-cacert", str(pki.ca), "--tls-cert", str(who.cert),
            "--tls-key", str(who.key)]


@pytest.mark.parametrize("loop", LOOPS)
def test_criu_lazy_pages_over_tls_from_lazymig_page_server(
        criu_tls: None, chroot_dir: ChrootDir, workload_binary: Path,
        measure: dict[str, Any], loop: str) -> None:
    d = chroot_dir
    pki = pki_in(d)
    workload, dumped = dump_workload(d, workload_binary, mib=16, children=0, measure=measure)
    with restored_from_lazymig_page_server(
            d, loop, measure, server_args=lazymig_tls_args(pki, pki.server),
            criu_args=criu_tls_args(d, pki, pki.client), tap=False) as (server_log, _):
        assert "(v1, TLS)" in server_log
        assert "tls: TLS handshake completed" in (d.host / "lazy-pages.log").read_text()
        check_restored_ticks(workload, dumped)


@pytest.mark.parametrize("loop", LOOPS)
def test_lazymig_daemon_over_tls_from_criu_lazy_dump(
        criu_tls: None, chroot_dir: ChrootDir, workload_binary: Path,
        measure: dict[str, Any], loop: str) -> None:
    d = chroot_dir
    pki = pki_in(d)
    workload = Workload(d, workload_binary, mib=16, children=0)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        workload.start()
        workload.wait_ticks({}, 2, timeout=10)
        dump, port = start_lazy_dump(d, workload, *criu_tls_args(d, pki, pki.server),
                                     what="criu dump --lazy-pages --tls")
        procs.append(dump)
        dumped = workload.output()
        images = ImagesDir(d.host)
        measure["lazy_pages"] = lazy_pages_in(images)
        restore_with_lazymig_daemon(
            d, images, ["--page-server", "--address", "127.0.0.1", "--port", str(port),
                        "--wire", "v1", *lazymig_tls_args(pki, pki.client)],
            loop=loop, measure=measure, procs=procs)
        assert dump.wait(30) == 0, log_errors(d.host / "dump.log")
        assert "tls: TLS handshake completed" in (d.host / "dump.log").read_text()
        measure["source_exit"] = workload.wait_gone()  # killed by criu dump after CLOSE
        check_restored_ticks(workload, dumped)
    except (CriuError, subprocess.TimeoutExpired, TimeoutError) as exc:
        raise AssertionError(f"{exc}\n{failure_context(d)}") from exc
    finally:
        for proc in reversed(procs):
            stop(proc)
        kill_restored(d)
        workload.kill()
