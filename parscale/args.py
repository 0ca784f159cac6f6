"""One validation of the numeric arguments shared by `generate`, `bench`, `compare`, `eval` and `init`.

Each function raises ParScaleError naming the option and the accepted range, so that every command
refuses the same value with the same words (and nothing reaches numpy, torch or ONNX Runtime that
would raise its own exception or, for threads, try to start thousands of threads).
"""

from __future__ import annotations

import math
import os
from typing import Any

from parscale.errors import ParScaleError

# numpy's and torch's generators both take seeds in [0, 2**63): one range for every command.
MAX_SEED = 2**63 - 1


def check_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None,
              why: str = "") -> int:
    """`value` as an int in [minimum, maximum]; bools, floats and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParScaleError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ParScaleError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ParScaleError(f"{name} must be <= {maximum}{why}, got {value}")
    return value


def check_float(value: Any, name: str, *, minimum: float | None = None, maximum: float | None = None) -> float:
    """A finite float (ints allowed) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParScaleError(f"{name} must be a finite number, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ParScaleError(f"{name} must be in [{minimum}, {maximum}], got {value}")
    return float(value)


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
    check_int(new_tokens, name, minimum=1)
    if prompt_tokens + new_tokens > context_length:
        raise ParScaleError(
            f"prompt ({prompt_tokens} tokens) plus {name} ({new_tokens}) exceeds the model's context length "
            f"of {context_length} tokens"
        )
    return new_tokens
