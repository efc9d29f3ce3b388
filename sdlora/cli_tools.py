"""Subcommands beyond `train`: each registers its parser and calls one library function."""

from __future__ import annotations

REGISTER: list = []
