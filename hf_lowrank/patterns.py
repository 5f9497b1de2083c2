"""Module-name patterns from adapter configs, matched in bounded time.

`target_modules`, `exclude_modules`, `rank_pattern` and `alpha_pattern` come from `adapter_config.json` files that
strangers publish, and they run against every module name of a model. Python's `re` backtracks: `"(.*.*)*X"` takes
minutes on an 18-character name. Patterns are therefore compiled with RE2 (`google-re2`), whose matching is linear
in the name's length; RE2 implements the syntax PEFT configs use (alternation, classes, repetition, anchors) and
refuses what it cannot run in linear time (backreferences, lookaround), which we report as an invalid pattern.

PEFT's semantics:
- a list of names matches a module whose dotted name equals an entry or ends in ``"." + entry``;
- a string is a regular expression that must match the whole dotted name (``fullmatch``);
- a `rank_pattern` / `alpha_pattern` key matches by ``fullmatch`` or as a dotted suffix (``(^|\\.)key$``).

A `rank_pattern` / `alpha_pattern` dict is compiled once (`pattern_table`), with bounds on its number of keys and
on the size of all its compiled keys together, so that matching every module of a model stays fast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

#: longest pattern accepted; real configs use a few dozen characters.
MAX_PATTERN_LENGTH = 2_000
#: RE2's memory budget per compiled pattern (bounds the automaton, and so the compile time, too).
_MAX_MEM = 8 << 20
#: most keys a `rank_pattern` / `alpha_pattern` may have: real configs hold at most one per adapted module.
MAX_PATTERN_KEYS = 4_096
#: RE2 instructions all keys of one such dict may compile to together (~16 MiB, ~0.1 s to compile); one key alone
#: may take up to ~130,000, and real keys (module names) take a few dozen.
MAX_TABLE_INSTRUCTIONS = 1 << 20


class PatternError(ValueError):
    """A module-name pattern that cannot be matched in bounded time, or is not a valid regular expression."""


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str):
    """The compiled RE2 pattern; `PatternError` naming it when it is too long, invalid or not linear-time."""
    return _compile(pattern, pattern)


def _compile(regex: str, pattern: str):
    """`regex` (`pattern` itself, or `pattern` wrapped) compiled by RE2; errors name `pattern`, what a config holds,
    whose length is the one limited."""
    import re2

    if not isinstance(pattern, str):
        raise PatternError(f"pattern {pattern!r} is not a string")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise PatternError(f"pattern {pattern[:40]!r}... is {len(pattern):,} characters long; at most "
                           f"{MAX_PATTERN_LENGTH:,} are accepted")
    options = re2.Options()
    options.log_errors = False  # RE2 would print every rejected pattern to stderr
    options.max_mem = _MAX_MEM
    try:
        return re2.compile(regex, options)
    except re2.error as e:
        reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise PatternError(f"pattern {pattern!r} is not a regular expression hf_lowrank can match in bounded time "
                           f"({reason}); backreferences and lookaround are not supported") from None


def check_pattern(pattern: str) -> None:
    """Raise `PatternError` unless `pattern` compiles (the check configs run when they are built)."""
    compile_pattern(pattern)


def dotted_suffixes(name: str) -> list[str]:
    """The name and each part of it after a dot: what a list entry must equal to match it (PEFT's rule, `name == p
    or name.endswith("." + p)`). For "model.q_proj": ["model.q_proj", "q_proj"]."""
    return [name, *(name[i + 1:] for i, c in enumerate(name) if c == ".")]


def first_entry(entries: Iterable[str]) -> Callable[[str], str | None]:
    """For a list of names (PEFT's matching): a function giving the first entry, in the list's order, that a module
    name matches (equal to it, or its dotted suffix), or None. The list is read once, into a dict: the time per name
    does not grow with the list, which a stranger's config may make 100,000 entries long."""
    order: dict[str, int] = {}
    for entry in entries:
        order.setdefault(entry, len(order))

    def first(name: str) -> str | None:
        hits = [s for s in dotted_suffixes(name) if s in order]
        return min(hits, key=order.__getitem__) if hits else None

    return first


def name_matcher(patterns: str | list[str]) -> Callable[[str], bool]:
    """PEFT's matching as a function of a module name, built once for many names: a list entry equals the name or
    is its dotted suffix (`first_entry`); a string is a full-match regex."""
    if isinstance(patterns, str):
        compiled = compile_pattern(patterns)
        return lambda name: compiled.fullmatch(name) is not None
    first = first_entry(patterns)
    return lambda name: first(name) is not None


class PatternTable:
    """The keys of a `rank_pattern` / `alpha_pattern` dict, each compiled once to what it matches: the whole name or
    a dotted suffix of it, as one full match (``(?:.*\\.)?(?:key)``, which is ``fullmatch(key)`` or
    ``search((^|\\.)(?:key)$)``)."""

    def __init__(self, keys: tuple[str, ...]):
        if len(keys) > MAX_PATTERN_KEYS:
            raise PatternError(f"{len(keys):,} keys given; at most {MAX_PATTERN_KEYS:,} are accepted")
        self._compiled, size = [], 0
        for key in keys:
            _compile(key, key)  # valid alone: else a key such as "a)|(b" would escape the group it is wrapped in
            compiled = _compile(rf"(?s:.*\.)?(?:{key})", key)
            size += compiled.programsize
            if size > MAX_TABLE_INSTRUCTIONS:
                raise PatternError(f"the keys compile to more than {MAX_TABLE_INSTRUCTIONS:,} RE2 instructions "
                                   f"together (reached at key {len(self._compiled) + 1:,}, {key[:40]!r})")
            self._compiled.append((key, compiled))
        self._found: dict[str, str | None] = {}  # module name -> first matching key: each name is matched once

    def first(self, module_name: str) -> str | None:
        """The first key that matches `module_name`, or None."""
        if module_name not in self._found:
            self._found[module_name] = next((k for k, c in self._compiled if c.fullmatch(module_name)), None)
        return self._found[module_name]


@functools.lru_cache(maxsize=8)
def pattern_table(keys: tuple[str, ...]) -> PatternTable:
    """The `PatternTable` of `keys`, compiled once; `PatternError` when a key is invalid or the keys are too many or
    too large together."""
    return PatternTable(keys)


def first_match(patterns: dict[str, object], module_name: str, default):
    """The value of the first key of `patterns` that matches `module_name` (fullmatch or dotted suffix)."""
    if not patterns:
        return default
    key = pattern_table(tuple(patterns)).first(module_name)
    return default if key is None else patterns[key]
