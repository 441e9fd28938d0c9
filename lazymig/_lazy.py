"""Package attributes imported on first use (PEP 562).

Importing a package must not load what its commands do not need: the
lazy-pages daemon's start-up is part of a migration's downtime, and every
module it loads is resident memory. A package lists what it re-exports and
from where; each name is imported when it is first looked up::

    __getattr__, __dir__ = lazy_exports(__name__, {"lazymig.uffd.daemon": ["DaemonReport"]})
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

TYPE_CHECKING = False  # typing is not imported: `lazymig --help` loads little more than argparse
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A ``__getattr__`` and a ``__dir__`` for ``package``: ``exports`` maps a module
    to the names it provides; each is imported on first use, then kept in the package."""
    module_of = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # once is enough
        return value

    def __dir__() -> list[str]:
        # What the package offers: not the helpers its own code imported
        # (TYPE_CHECKING, annotations, lazy_exports), which are no API.
        namespace = vars(sys.modules[package])
        public = set(namespace.get("__all__", ()))
        submodules = {name for name, value in namespace.items()
                      if isinstance(value, ModuleType) and not name.startswith("_")
                      and value.__name__ == f"{package}.{name}"}
        dunders = {name for name in namespace if name.startswith("__")}
        return sorted(public | submodules | dunders | set(module_of))

    return __getattr__, __dir__
