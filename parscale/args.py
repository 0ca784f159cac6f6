"""One validation of the numeric arguments shared by `generate`, `bench`, `compare`, `eval` and `init`.

Each function raises ParScaleError naming the option and the accepted range, so that every command
refuses the same value with the same words (and nothing reaches numpy, torch or ONNX Runtime that
would raise its own exception or, for threads, try to start thousands of threads).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

from parscale.errors import ParScaleError

# numpy's and torch's generators both take seeds in [0, 2**63): one range for every command.
MAX_SEED = 2**63 - 1


def is_integer(value: Any) -> bool:
    """An int or a numpy integer, not a bool (nor numpy's bool, which is no `numbers.Integral`)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int, float or numpy number (`numbers.Real`), not a bool."""
    return isinstance(value, numbers.Real) and not _is_bool(value)


def _is_bool(value: Any) -> bool:
    """Python's bool or numpy's (numpy.bool_, named `bool` since numpy 2), without importing numpy."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def check_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None,
              why: str = "") -> int:
    """`value` as an int in [minimum, maximum]; numpy integers are taken, bools, floats and strings refused."""
    if not is_integer(value):
        raise ParScaleError(f"{name} must be an integer, got {_shown(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ParScaleError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ParScaleError(f"{name} must be <= {maximum}{why}, got {value}")
    return value


def check_float(value: Any, name: str, *, minimum: float | None = None, maximum: float | None = None) -> float:
    """A finite float (ints and numpy numbers allowed, bools not) in [minimum, maximum]."""
    if not is_number(value) or not math.isfinite(value):
        raise ParScaleError(f"{name} must be a finite number, got {_shown(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        span = f"in [{minimum}, {maximum}]" if None not in (minimum, maximum) else \
            f">= {minimum}" if maximum is None else f"<= {maximum}"
        raise ParScaleError(f"{name} must be {span}, got {value}")
    return float(value)


def check_bool(value: Any, name: str) -> bool:
    """True or False (numpy's bool too); "no", 0 and None are refused rather than read as truth values."""
    if not _is_bool(value):
        raise ParScaleError(f"{name} must be True or False, got {_shown(value)}")
    return bool(value)


def check_stop(stop: Any, name: str = "stop") -> list[str]:
    """None, a non-empty string, or a list/tuple of them -> a list of strings."""
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise ParScaleError(f"{name} takes non-empty strings (one, or a list of them), got {_shown(stop)}")
    return list(stops)


def _shown(value: Any) -> str:
    """A value in a message: its repr (shortened), with its type where the repr hides it ('1' vs 1)."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return text if isinstance(value, (int, float, str)) and not isinstance(value, bool) else \
        f"{text} ({type(value).__name__})"


def check_seed(seed: Any, name: str = "seed") -> int | None:
    """None (nondeterministic) or an integer in [0, 2**63)."""
    return None if seed is None else check_int(seed, name, minimum=0, maximum=MAX_SEED)


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, which containers restrict), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_threads(threads: Any, name: str = "threads") -> int | None:
    """None (the runtime's default) or a thread count >= 1, clamped to the CPUs available.

    Clamped rather than refused: more threads than CPUs never helps, and ONNX Runtime would try to
    start every one of them (an absurd value did not return).
    """
    if threads is None:
        return None
    return min(check_int(threads, name, minimum=1), available_cpus())


def check_window(window: Any, context_length: int, name: str = "window") -> int:
    """A window of tokens that fits the model's context (positions beyond it were never trained)."""
    return check_int(window, name, minimum=1, maximum=context_length,
                     why=" (the model's context length)")


def check_generation(prompt_tokens: int, new_tokens: Any, context_length: int, name: str = "max_new_tokens") -> int:
    """New tokens >= 1 such that prompt + new tokens fit the context."""
    new_tokens = check_int(new_tokens, name, minimum=1)
    if prompt_tokens + new_tokens > context_length:
        raise ParScaleError(
            f"prompt ({prompt_tokens} tokens) plus {name} ({new_tokens}) exceeds the model's context length "
            f"of {context_length} tokens"
        )
    return new_tokens
