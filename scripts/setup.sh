#!/usr/bin/env bash
# Install everything lazymig and its tests need on a fresh Debian machine (run as root):
# Debian's criu package (for crit, which checks our images), gcc and iproute2 (test
# workloads and network namespaces), and a virtualenv in .venv with lazymig installed
# in editable mode (visible to type checkers) with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v crit >/dev/null || need+=(criu)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq "${need[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# editable_mode=compat: a plain path entry (a .pth) instead of setuptools' import
# hook, which type checkers cannot follow (mypy: "Cannot find implementation or
# library stub for module named lazymig").
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]' \
	--config-settings editable_mode=compat
# Bytecode now, as pip compiles a regular install (an editable one it does not): else the
# first run of each command compiles the modules it loads (0.09 s of CPU of `lazymig dump`'s
# start-up until ready here), and every run does under PYTHONDONTWRITEBYTECODE, which stops Python
# from writing the cache but not from reading it.
.venv/bin/python -m compileall -q lazymig >/dev/null
