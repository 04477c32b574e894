"""Which examples go together: packing into rows, and each epoch's batches (shuffled, optionally grouped by
length). Pure index arithmetic over example lengths, seeded, so any epoch can be rebuilt on resume."""

import bisect

import torch

MEGABATCH = 50
"""Length grouping sorts within windows of this many batches: little padding, yet still shuffled."""


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each example, longest first, goes into the row with the least room that still
    fits it. Returns rows of example indices whose lengths sum to at most `capacity`."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), kept sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            room, row = free.pop(slot)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(index)
        bisect.insort(free, (room - length, row))
    return rows


def epoch_batches(
    lengths: list[int], batch_size: int, *, seed: int, group_by_length: bool
) -> list[list[int]]:
    """One epoch's batches of example indices: a seeded shuffle, or with `group_by_length` a seeded
    shuffle whose windows of MEGABATCH batches are sorted longest first, then the batches shuffled."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        window = batch_size * MEGABATCH
        order = [
            index
            for start in range(0, len(order), window)
            for index in sorted(order[start : start + window], key=lambda i: -lengths[i])
        ]
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches
