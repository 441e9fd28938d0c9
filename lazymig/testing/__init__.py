"""Test tools for code that drives lazymig: real sockets and real faults, no mocks.

:mod:`lazymig.testing.proxy` holds :class:`~lazymig.testing.proxy.FaultProxy`,
a TCP proxy that cuts, delays and refuses connections on demand.
"""
