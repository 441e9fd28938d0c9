"""Run one fuzz target under atheris (coverage-guided, libFuzzer underneath).

    python -m fuzz.run TARGET [libFuzzer options] [CORPUS_DIR ...]

from the repository root, e.g. ``python -m fuzz.run images -max_total_time=60
/tmp/new fuzz/corpus/images``: new inputs that reach new code go to the first
directory. lazymig's modules are instrumented for coverage as they are
imported. A target that raises anything but its documented bad-input error
(or fails an assertion) is a crash: libFuzzer writes the input to a
``crash-*`` file and exits non-zero.
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports(include=["lazymig", "fuzz"]):
    from fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m fuzz.run TARGET [libFuzzer options]; targets: "
                 f"{', '.join(TARGETS)}")
    name = sys.argv[1]
    # libFuzzer runs argv[0] through the shell for -merge: make it this very command.
    atheris.Setup([f"{sys.executable} -m fuzz.run {name}", *sys.argv[2:]], TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
