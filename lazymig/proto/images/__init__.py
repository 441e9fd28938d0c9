"""CRIU-compatible images: the schema (``*.proto``, CRIU's names and numbers) and
the generated ``*_pb2`` modules (``python -m lazymig.proto.images.regen``)."""

from __future__ import annotations

__all__: list[str] = []
