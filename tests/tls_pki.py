"""Test helper: two throw-away CAs and the certificates the TLS tests need, made with
the ``openssl`` command line in a temporary directory.

* ``ca`` signs ``server`` and ``client`` (both named 127.0.0.1 and localhost:
  CRIU checks the client's certificate against the address the server was
  given), ``elsewhere`` (named elsewhere.example only) and ``revoked``
  (revoked in ``crl``);
* ``other_ca`` signs ``stranger`` (named 127.0.0.1 too, but from another CA).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lazymig.tls import TlsConfig

OPENSSL = shutil.which("openssl")

_LEAF_EXT = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = {san}
"""

_CA_CONFIG = """[ca]
default_ca = ca_default
[ca_default]
database = {dir}/index.txt
crlnumber = {dir}/crlnumber
default_md = sha256
default_crl_days = 2
"""


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path
    other_ca: Path
    crl: Path
    server: Identity
    client: Identity
    elsewhere: Identity
    revoked: Identity
    stranger: Identity

    def config(self, who: Identity, *, cacert: Path | None = None, verify_cn: bool = True,
               cacrl: Path | None = None) -> TlsConfig:
        """``who`` trusting ``cacert`` (the test CA by default)."""
        return TlsConfig(cacert=cacert or self.ca, cacrl=cacrl, cert=who.cert, key=who.key,
                         verify_cn=verify_cn)


def _openssl(*args: str | Path) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *map(str, args)], check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN=lazymig test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _leaf(directory: Path, name: str, ca: tuple[Path, Path], cn: str, san: str,
          serial: int) -> Identity:
    cert, key, csr = (directory / f"{name}{ext}" for ext in (".pem", ".key", ".csr"))
    ext = directory / f"{name}.ext"
    ext.write_text(_LEAF_EXT.format(san=san))
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-set_serial",
             str(serial), "-days", "2", "-out", cert, "-extfile", ext)
    return Identity(cert, key)


def make_pki(directory: Path) -> Pki:
    """Every certificate above, under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "ca")
    other_ca = _ca(directory, "other-ca")
    here = "IP:127.0.0.1,DNS:localhost"
    identities = {
        "server": _leaf(directory, "server", ca, "127.0.0.1", here, 1),
        "client": _leaf(directory, "client", ca, "127.0.0.1", here, 2),
        "elsewhere": _leaf(directory, "elsewhere", ca, "elsewhere.example",
                           "DNS:elsewhere.example", 3),
        "revoked": _leaf(directory, "revoked", ca, "127.0.0.1", here, 4),
        "stranger": _leaf(directory, "stranger", other_ca, "127.0.0.1", here, 5),
    }
    (directory / "index.txt").write_text("")
    (directory / "crlnumber").write_text("01\n")
    config = directory / "ca.cnf"
    config.write_text(_CA_CONFIG.format(dir=directory))
    _openssl("ca", "-config", config, "-keyfile", ca[1], "-cert", ca[0],
             "-revoke", identities["revoked"].cert)
    crl = directory / "crl.pem"
    _openssl("ca", "-config", config, "-keyfile", ca[1], "-cert", ca[0], "-gencrl", "-out", crl)
    return Pki(directory, ca[0], other_ca[0], crl, **identities)
