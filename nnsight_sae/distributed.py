"""Data-parallel runs (``accelerate launch``): the process state and the reductions the
harvest and the trainer need, on accelerate's. In one process every call is a no-op."""

from __future__ import annotations

import torch
from accelerate import PartialState
from accelerate.utils import broadcast, reduce


def state() -> PartialState:
    """accelerate's process state; joins the process group when launched with several
    processes (gloo on a machine without CUDA, where accelerate would otherwise not
    distribute at all)."""
    return PartialState(cpu=not torch.cuda.is_available())


def rank() -> int:
    return state().process_index


def world() -> int:
    return state().num_processes


def mean_(tensors) -> None:
    """Average each tensor across processes, in place."""
    if world() > 1:
        for t in tensors:
            t.copy_(reduce(t, reduction="mean"))


def reduce_value(value: float, reduction: str) -> float:
    """A Python number reduced across processes ("sum", "mean" or "max"; min as -max(-x))."""
    if world() == 1:
        return value
    if reduction == "min":
        return -reduce_value(-value, "max")
    return float(reduce(torch.tensor([value], dtype=torch.float64), reduction=reduction)[0])


def any_(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask true where it is true on any process."""
    if world() == 1:
        return mask
    return reduce(mask.to(torch.int32), reduction="max").bool()


def broadcast_(tensors) -> None:
    """Every process takes the first process's values, in place."""
    if world() > 1:
        for t in tensors:
            t.copy_(broadcast(t.contiguous(), from_process=0))


def end() -> None:
    """Leave the process group once every process is done (the first one saves and
    evaluates after the others have stopped training). A process that exits while its
    group is still up can abort in gloo's teardown."""
    if world() > 1:
        state().wait_for_everyone()
        state().destroy_process_group()
