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
"""

from __future__ import annotations

import functools

#: longest pattern accepted; real configs use a few dozen characters.
MAX_PATTERN_LENGTH = 2_000
#: RE2's memory budget per compiled pattern (bounds the automaton, and so the compile time, too).
_MAX_MEM = 8 << 20


class PatternError(ValueError):
    """A module-name pattern that cannot be matched in bounded time, or is not a valid regular expression."""


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str):
    """The compiled RE2 pattern; `PatternError` naming it when it is too long, invalid or not linear-time."""
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
        return re2.compile(pattern, options)
    except re2.error as e:
        reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise PatternError(f"pattern {pattern!r} is not a regular expression hf_lowrank can match in bounded time "
                           f"({reason}); backreferences and lookaround are not supported") from None


def check_pattern(pattern: str) -> None:
    """Raise `PatternError` unless `pattern` compiles (the check configs run when they are built)."""
    compile_pattern(pattern)


def name_matches(patterns: str | list[str], module_name: str) -> bool:
    """PEFT's matching: a list entry equals the name or is its dotted suffix; a string is a full-match regex."""
    if isinstance(patterns, str):
        return compile_pattern(patterns).fullmatch(module_name) is not None
    return any(module_name == p or module_name.endswith("." + p) for p in patterns)


def first_match(patterns: dict[str, object], module_name: str, default):
    """The value of the first key of `patterns` that matches `module_name` (fullmatch or dotted suffix)."""
    for key, value in patterns.items():
        if compile_pattern(key).fullmatch(module_name) or compile_pattern(rf"(^|\.)(?:{key})$").search(module_name):
            return value
    return default
