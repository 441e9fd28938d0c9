"""lazymig.uffd.uffd without a faulting process: handshake, ownership, closing, errors.

Nothing here registers memory of the test process, so nothing can fault here;
the fault paths are in test_uffd_kernel.py, with a child process.
"""

from __future__ import annotations

import errno
import gc
import os

import pytest

from lazymig.errors import (
    ClosedResourceError,
    ConfigurationError,
    LazyMigOSError,
)
from lazymig.linux import uffd as sys_uffd
from lazymig.proto.uffd import UFFD_API, Feature, Ioctl
from lazymig.uffd.uffd import (
    DEFAULT_FEATURES,
    FeatureUnavailableError,
    Uffd,
    UffdError,
    kernel_features,
)

TIMEOUT = 10


def test_open_does_the_handshake_for_requested_features_only() -> None:
    with Uffd.open() as uffd:
        assert uffd.fd >= 0
        assert uffd.features == DEFAULT_FEATURES == 0x4E
        assert uffd.kernel_features is not None
        assert uffd.kernel_features & DEFAULT_FEATURES == DEFAULT_FEATURES
        assert not os.get_blocking(uffd.fd)
        assert os.get_inheritable(uffd.fd) is False
        # the handshake is done: a second UFFDIO_API is refused by the kernel
        with pytest.raises(UffdError) as info:
            sys_uffd.api(uffd.fd, 0)
        assert info.value.errno == errno.EINVAL
    assert uffd.fd == -1
    with Uffd.open(Feature(0), non_blocking=False, cloexec=False) as plain:
        assert plain.features == 0
        assert os.get_blocking(plain.fd)
        assert os.get_inheritable(plain.fd)


def test_kernel_features() -> None:
    supported = kernel_features()
    assert supported & DEFAULT_FEATURES == DEFAULT_FEATURES


def test_open_refuses_missing_features_by_name() -> None:
    unknown = 1 << 40
    with pytest.raises(FeatureUnavailableError) as info:
        Uffd.open(Feature.EVENT_FORK | unknown)
    assert info.value.missing == unknown
    assert info.value.errno == errno.EINVAL
    assert hex(unknown) in str(info.value)
    assert "EVENT_FORK" not in str(info.value)  # only what is missing is named
    assert isinstance(info.value, UffdError)


def test_dev_userfaultfd_fallback() -> None:
    fd = sys_uffd.open_dev_userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        api, supported, ioctls = sys_uffd.api(fd, int(DEFAULT_FEATURES))
        assert api == UFFD_API
        assert supported & DEFAULT_FEATURES == DEFAULT_FEATURES
        assert ioctls & Ioctl.REGISTER
    finally:
        os.close(fd)


def test_userfaultfd_falls_back_to_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # An architecture without a known syscall number is ENOSYS: the device is used.
    monkeypatch.setattr(sys_uffd, "_syscall_nr", lambda: None)
    used: list[int] = []
    real = sys_uffd.open_dev_userfaultfd

    def spy(flags: int) -> int:
        used.append(flags)
        return real(flags)

    monkeypatch.setattr(sys_uffd, "open_dev_userfaultfd", spy)
    with Uffd.open() as uffd:
        assert uffd.features == DEFAULT_FEATURES
    assert used == [os.O_CLOEXEC | os.O_NONBLOCK]


def test_from_fd_adopts_and_makes_non_blocking() -> None:
    blocking = Uffd.open(non_blocking=False)
    adopted = Uffd.from_fd(os.dup(blocking.fd), pid=1234)
    blocking.close()
    try:
        assert not os.get_blocking(adopted.fd)
        assert adopted.pid == 1234
        assert adopted.features is None
        assert adopted.read_events() == []
    finally:
        adopted.close()
    with pytest.raises(ConfigurationError):
        Uffd.from_fd(-1)


def test_read_events_is_empty_when_nothing_is_queued() -> None:
    with Uffd.open() as uffd:
        assert uffd.read_events() == []


def test_argument_checks() -> None:
    with Uffd.open() as uffd:
        with pytest.raises(ConfigurationError):
            uffd.copy(0x1001000, b"x" * 4096, 8192)  # longer than the buffer
        with pytest.raises(ConfigurationError):
            uffd.copy(0x1000800, b"x" * 4096)  # unaligned destination
        with pytest.raises(ConfigurationError):
            uffd.copy(0x1000000, b"x" * 100)  # not a page multiple
        with pytest.raises(ConfigurationError):
            uffd.copy(0x1000000, 0x2000000)  # an address needs a length
        with pytest.raises(ConfigurationError):
            uffd.zeropage(0x1000000, 0)
        with pytest.raises(TypeError):
            uffd.copy(0x1000000, "not a buffer")
        # unregistered memory: the kernel says ENOENT, an UffdError
        with pytest.raises(UffdError) as info:
            uffd.zeropage(0x1000000, 4096)
        assert info.value.errno == errno.ENOENT
        assert info.value.op == "UFFDIO_ZEROPAGE"
        assert info.value.recoverable


def test_error_classification() -> None:
    def err(code: int, op: str = "UFFDIO_COPY") -> UffdError:
        return UffdError(code, op, pid=42)

    assert all(err(e).recoverable for e in (errno.EAGAIN, errno.EEXIST, errno.ENOENT))
    assert not err(errno.ESRCH).recoverable
    assert err(errno.ESRCH).process_gone and err(errno.ENOSPC).process_gone
    assert err(errno.ENOMEM, "UFFDIO_UNREGISTER").process_gone
    assert not err(errno.ENOMEM, "UFFDIO_COPY").process_gone
    assert not err(errno.EINVAL).process_gone
    e = err(errno.ESRCH)
    assert isinstance(e, LazyMigOSError) and isinstance(e, OSError)
    assert e.pid == 42 and e.errno == errno.ESRCH
    assert "UFFDIO_COPY" in str(e) and "ESRCH" in str(e) and "42" in str(e)


def test_close_is_idempotent_and_final() -> None:
    uffd = Uffd.open()
    fd = uffd.fd
    uffd.close()
    uffd.close()
    assert uffd.fd == -1 and uffd.closed
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF
    for call in (uffd.read_events, uffd.fileno, lambda: uffd.wake(0, 4096),
                 lambda: uffd.copy(0, b"x" * 4096), lambda: uffd.register(0, 4096)):
        with pytest.raises(ClosedResourceError):
            call()


def test_del_closes_with_resource_warning() -> None:
    uffd = Uffd.open()
    fd = uffd.fd
    with pytest.warns(ResourceWarning, match="unclosed <Uffd"):
        del uffd
        gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)
