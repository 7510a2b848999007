"""aigc-ray: fine-tune and serve generative language models on a Ray cluster."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"


def hand_on(package: str, homes: dict[str, str]):
    """A wing's module `__getattr__` (PEP 562): its public names, each imported from its home
    module when first used, so importing one light module of a wing never loads the heavy ones
    (the wire format loads no torch, `aigc-ray --help` no Ray)."""

    def __getattr__(name: str):
        if name in homes:
            return getattr(importlib.import_module(f"{package}.{homes[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
