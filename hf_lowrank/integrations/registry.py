"""The registry of every patch hf_lowrank applies to another library's code, and the way to undo them.

A patch is registered once, where it is implemented, with what it replaces, why, and the test that covers it:

    @register("transformers:Trainer._load_best_model", group="trainer", why="...", test="tests/...::test_...")
    def _wrap_load_best_model(original): ...     # gets what the attribute held, returns what replaces it

`install(group)` applies a group's patches once (idempotent); nothing is applied at import. `uninstall()` puts
back exactly what was there (an attribute that the class only inherited is deleted again; an inherited `__new__`
gets its pass-through equivalent, since CPython cannot take a class's own `__new__` back). Every replacement is a
strict no-op for models that are not hf_lowrank's. `PATCHES` lists them all (the README's table comes from it).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_MISSING = object()


@dataclass(frozen=True)
class Patch:
    """One replaced attribute of another library.

    Args:
        target: ``"module:Owner.attr"`` (an attribute of a class) or ``"module:attr"`` (of a module).
        group: installed together: ``"trainer"`` (Trainer checkpoints, saves, Hub), ``"hook"`` (the global
            `from_pretrained` hook and what it needs), ``"trl"``.
        why: what transformers (or TRL) does without it, for our models.
        test: the test that fails when the patch stops working or stops being needed.
        wrap: original → replacement (``original`` is the attribute as stored: a function, a classmethod object...).
    """

    target: str
    group: str
    why: str
    test: str
    wrap: Callable[[Any], Any]

    def resolve(self) -> tuple[Any, str]:
        module_name, _, path = self.target.partition(":")
        owner: Any = importlib.import_module(module_name)
        *owners, attr = path.split(".")
        for name in owners:
            owner = getattr(owner, name)
        return owner, attr


PATCHES: dict[str, Patch] = {}
_applied: dict[str, tuple[Any, str, Any]] = {}  # target -> (owner, attr, what its own __dict__ held)


def register(target: str, *, group: str, why: str, test: str):
    """Decorator: record `wrap` as the patch of `target` (applied only by `install`)."""

    def decorate(wrap: Callable[[Any], Any]) -> Callable[[Any], Any]:
        PATCHES[target] = Patch(target, group, " ".join(why.split()), test, wrap)
        return wrap

    return decorate


def install(group: str) -> None:
    """Apply every registered patch of `group` that is not applied yet."""
    for target, patch in PATCHES.items():
        if patch.group != group or target in _applied:
            continue
        owner, attr = patch.resolve()
        own = owner.__dict__.get(attr, _MISSING) if hasattr(owner, "__dict__") else _MISSING
        current = inspect.getattr_static(owner, attr)
        replacement = patch.wrap(current)
        setattr(owner, attr, replacement)
        _applied[target] = (owner, attr, own)


def uninstall(group: str | None = None, target: str | None = None) -> None:
    """Undo applied patches (all, one group's, or one target's), restoring exactly what was there."""
    for name in reversed(list(_applied)):
        if (group is not None and PATCHES[name].group != group) or (target is not None and name != target):
            continue
        owner, attr, own = _applied.pop(name)
        if own is _MISSING and attr == "__new__":
            # CPython keeps a class's `__new__` slot once one was set: after `del`, object.__new__ would refuse the
            # constructor's arguments. The equivalent of the inherited one is put back instead.
            setattr(owner, attr, staticmethod(_inherited_new))
        elif own is _MISSING:
            delattr(owner, attr)
        else:
            setattr(owner, attr, own)


def _inherited_new(cls, *args, **kwargs):
    """object.__new__ as a class without its own `__new__` gets it: the arguments go to `__init__`."""
    return object.__new__(cls)


def installed() -> list[str]:
    """Targets currently patched, in the order they were applied."""
    return list(_applied)


def wraps(original: Any, replacement: Callable) -> Callable:
    """Mark `replacement` as wrapping `original` (functools-style `__wrapped__`, name and docstring)."""
    func = getattr(original, "__func__", original)
    replacement.__wrapped__ = func
    for name in ("__name__", "__qualname__", "__doc__", "__module__"):
        if hasattr(func, name):
            setattr(replacement, name, getattr(func, name))
    return replacement
