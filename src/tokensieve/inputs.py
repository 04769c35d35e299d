"""Every check of what a caller passes to the engine, in one place: each bad value is a clear error naming it.

The API and the CLI call the same functions (the CLI before the model loads), so a value is refused with
the same words wherever it comes from. `what` is the name to show: the API's argument or the CLI's option.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def check_prompt(prompt: Any, chat: bool = False, what: str = "prompt") -> None:
    """A prompt is non-empty text or token ids; the chat template applies to text only."""
    if isinstance(prompt, (bytes, bytearray)):
        raise TypeError(
            f"{what} is bytes ({bytes(prompt[:16])!r}...): decode it to text first (e.g. .decode('utf-8')), "
            "or pass token ids as a list of ints"
        )
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"the {what} is empty: pass some text or token ids")
        return
    if chat:
        raise ValueError(
            f"chat=True applies the chat template to text, but the {what} is token ids: pass the {what} as text, "
            "or render the template yourself (tokenizer.apply_chat_template) and pass chat=False"
        )


def token_ids(ids: Any, vocab_size: int | None = None, what: str = "prompt", allow_empty: bool = False) -> list[int]:
    """Token ids as a list of ints: from a list or tuple of ints (numpy ints too), a 1-D (or one-row) torch
    tensor or numpy array of an integer dtype. Bools and floats are refused; ids must lie in `[0, vocab_size)`.
    """
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        ids = _array_ids(ids, what)
    elif isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Sequence):
        raise TypeError(f"{what} token ids must be a list of ints, got {type(ids).__name__}")
    if not ids and not allow_empty:
        raise ValueError(f"the {what} is empty: pass some text or token ids")
    out = [_token_id(value, index, what) for index, value in enumerate(ids)]
    for index, value in enumerate(out):
        if value < 0 or (vocab_size is not None and value >= vocab_size):
            limit = f"[0, {vocab_size})" if vocab_size is not None else "ids >= 0"
            raise ValueError(f"{what} token id {value} at index {index} is out of range: this model takes {limit}")
    return out


def _array_ids(array: torch.Tensor | np.ndarray, what: str) -> list:
    if isinstance(array, torch.Tensor):
        integer = array.dtype != torch.bool and not array.dtype.is_floating_point and not array.dtype.is_complex
    else:
        integer = array.dtype.kind in "iu"  # numpy's bool kind is "b"
    if not integer:
        raise TypeError(f"{what} token ids must have an integer dtype, got {array.dtype}")
    if array.ndim > 1 and not (array.ndim == 2 and array.shape[0] == 1):
        raise ValueError(f"{what} token ids must be one sequence (1-D or one row), got shape {tuple(array.shape)}")
    return array.reshape(-1).tolist()


def _token_id(value: Any, index: int, what: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} token id at index {index} is {value!r}, a bool: token ids are ints")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{what} token id at index {index} is {value!r} ({type(value).__name__}): token ids are ints"
        ) from None


def max_new_tokens(value: Any, what: str = "max_new_tokens") -> int:
    """An int >= 1 (a bool is not a count)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    return int(value)


def temperature(value: Any, what: str = "temperature") -> float:
    """A finite number >= 0; 0 is greedy."""
    number = _real(value, what, "a number >= 0 (0 is greedy)")
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite (0 is greedy, 1 samples the model's own distribution), got {value}")
    if number < 0:
        raise ValueError(f"{what} must be >= 0 (0 is greedy), got {value}")
    return number


def top_p(value: Any, what: str = "top_p") -> float:
    """The nucleus mass, in (0, 1]; 1 keeps every token."""
    number = _real(value, what, "a number in (0, 1]")
    if not 0 < number <= 1:  # NaN fails this too
        raise ValueError(f"{what} must be in (0, 1] (1 keeps every token), got {value}")
    return number


def seed(value: Any, what: str = "seed") -> int | None:
    """None (a random seed) or an int in [0, 2**64)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int (or None for a random seed), got {value!r} ({type(value).__name__})")
    if not 0 <= value < 2**64:
        raise ValueError(f"{what} must be in [0, 2**64), got {value}")
    return int(value)


def stop_strings(stop: Any, what: str = "stop") -> list[str]:
    """None, one string or a list of strings, none of them empty (an empty one would stop at once)."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    elif isinstance(stop, (bytes, bytearray)) or not isinstance(stop, Sequence):
        raise TypeError(f"{what} must be a string or a list of strings, got {stop!r} ({type(stop).__name__})")
    for index, item in enumerate(stop):
        if not isinstance(item, str):
            raise TypeError(f"{what} string at index {index} is {item!r} ({type(item).__name__}): give strings")
        if not item:
            raise ValueError(f"{what} holds an empty string, which would stop before any text: remove it")
    return list(stop)


def _real(value: Any, what: str, expected: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be {expected}, got {value!r} ({type(value).__name__})")
    return float(value)
