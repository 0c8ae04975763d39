"""The sampling loops' progress: a tqdm bar for a person at a terminal, or a callback per step.

Serving streams one event per diffusion step through the callback, and cancels a request by
raising from it: the exception leaves the loop before the next step's model call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from tqdm import tqdm

Item = TypeVar("Item")
StepCallback = Callable[[int, int], None]  # (steps done, steps in all)


def sampling_steps(items: Sequence[Item], progress: bool | StepCallback) -> Iterator[Item]:
    """Iterate over a sampler's steps: `progress=True` shows a bar; a callable is called with
    (done, total) after each step, and may raise to stop sampling there."""
    if not callable(progress):
        yield from tqdm(items, desc="sampling", disable=not progress, leave=False)
        return
    total = len(items)
    for index, item in enumerate(items):
        yield item
        progress(index + 1, total)
