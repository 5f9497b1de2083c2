"""Code that reaches into other libraries: the Trainer's seams (`transformers`), the global `from_pretrained` hook
(`hook`), the Trainer callback (`callback`), and TRL. Every patch is listed in `registry.PATCHES` and undone by
`uninstall()`; importing this package applies nothing.
"""

from .registry import PATCHES, installed, uninstall

__all__ = ["PATCHES", "installed", "uninstall"]
