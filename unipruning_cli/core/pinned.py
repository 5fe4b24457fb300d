"""Host memory for state that moves to and from a GPU: exact-size pinned arenas, and what pinning really costs.

Every ``pin_memory=True`` tensor goes through CUDA's caching host allocator, which rounds each request up to the
next power of two and keeps freed blocks pinned (``ATen/core/CachingHostAllocator.h``: ``roundSize`` is
``PowerOf2Ceil`` below ``pinned_max_round_threshold``, default no threshold; the ``torch.cuda.host_memory_stats``
docstring). Qwen2.5-7B's matrices sit just above powers of two (an fp32 MLP matrix of 259 MiB takes 512 MiB), so
pinning V, Γ and a restore copy matrix by matrix takes 1.9x what they hold (``shared/docs/gpu-readiness.md`` §1a).

:class:`HostArena` asks the allocator for chunks of exactly a power of two bytes each, sized after the binary digits of
the total, and packs the tensors into them (:func:`arena_layout`); each tensor is a view of its chunk. What the
allocator takes is then the chunks' sum (:func:`arena_bytes`, the plan's figure), under 0.1 % above what the tensors
hold at 7B, on every torch version (no allocator setting needed). :func:`empty_host_cache` hands the
freed chunks back to the OS once an arena is released.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

#: The smallest chunk an arena asks for (bytes): a power of two, so the allocator takes it exactly.
CHUNK = 1 << 20
#: Each tensor starts at a multiple of this many bytes in its chunk (coalesced copies; any dtype's alignment).
ALIGN = 512


def allocator_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching host allocator takes for one pinned request of ``nbytes`` (the next power of two)."""
    return 0 if nbytes <= 0 else 1 << (int(nbytes) - 1).bit_length()


def _aligned(nbytes: int) -> int:
    return -(-int(nbytes) // ALIGN) * ALIGN


def arena_layout(sizes: Sequence[int], smallest: int = CHUNK) -> tuple[list[int], list[tuple[int, int]]]:
    """Where :class:`HostArena` puts tensors of ``sizes`` bytes: ``(chunks, places)``, ``chunks`` the bytes of each
    chunk (powers of two) and ``places[i] = (chunk index, byte offset)`` of tensor ``i``.

    Each chunk is the largest power of two not above what is left to place (at least ``smallest``, and at least the
    largest tensor left), filled first-fit from the largest tensor down: the chunks follow the binary digits of the
    total, so only the last, smallest ones have room to spare (Qwen2.5-7B's V: 24.31 GiB in 24.32 GiB of chunks,
    against 45.9 GiB pinned matrix by matrix). The layout depends on the sizes alone."""
    left = sorted(range(len(sizes)), key=lambda i: -int(sizes[i]))  # largest first, ties in the given order
    chunks: list[int] = []
    places: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    while left:
        total = sum(_aligned(sizes[i]) for i in left)
        chunk = max(allocator_bytes(smallest), allocator_bytes(_aligned(sizes[left[0]])),
                    1 << (total.bit_length() - 1))
        used, rest = 0, []
        for i in left:
            size = _aligned(sizes[i])
            if used + size <= chunk:
                places[i] = (len(chunks), used)
                used += size
            else:
                rest.append(i)
        chunks.append(chunk)
        left = rest
    return chunks, places


def arena_bytes(sizes: Sequence[int], smallest: int = CHUNK) -> int:
    """Host bytes a :class:`HostArena` of tensors of ``sizes`` bytes takes (its chunks, whole)."""
    return sum(arena_layout(sizes, smallest)[0])


def copy_bytes(numels: Sequence[int], item: int, pinned: bool) -> int:
    """Host bytes of one copy of tensors of ``numels`` elements, ``item`` bytes each: as a :class:`HostArena` takes
    them where ``pinned``, else exactly (the memory plan's figure for V, Γ and the restore copies)."""
    nbytes = [n * item for n in numels]
    return arena_bytes(nbytes) if pinned else sum(nbytes)


class HostArena:
    """Tensors of ``shapes`` (one dtype) as views of a few power-of-two host chunks, pinned where ``pin``.

    ``tensors``: name -> tensor of that shape, zero-filled. ``nbytes``: the bytes the chunks take (what the allocator
    holds: :func:`arena_bytes`). :meth:`release` drops the arena's own references; the memory goes back once no view
    is alive either (then :func:`empty_host_cache` returns pinned chunks to the OS). ``smallest``: the least chunk
    size (tests use small ones). Raises what ``torch.empty``
    raises (``RuntimeError`` when ``pin`` is asked for without CUDA)."""

    def __init__(self, shapes: Mapping[str, torch.Size], dtype: torch.dtype = torch.float32, pin: bool = False,
                 smallest: int = CHUNK) -> None:
        names = list(shapes)
        item = torch.empty((), dtype=dtype).element_size()
        sizes = [torch.Size(shapes[n]).numel() * item for n in names]
        chunks, places = arena_layout(sizes, smallest)
        self._chunks = [torch.zeros(c, dtype=torch.uint8, pin_memory=pin) for c in chunks]
        self.nbytes = sum(chunks)
        self.tensors: dict[str, torch.Tensor] = {}
        for n, size, (k, offset) in zip(names, sizes, places):
            self.tensors[n] = self._chunks[k][offset:offset + size].view(dtype).view(shapes[n])

    def release(self) -> None:
        self.tensors = {}
        self._chunks = []


class HostCopy:
    """A copy in host memory of tensors that go back to where they came from (the weights a stage restores): one
    pinned :class:`HostArena` where they live on a GPU (fast copies back, no power-of-two rounding), plain host
    tensors otherwise (and for tensors of several dtypes). ``tensors``: key -> copy, keyed as ``named``.
    :meth:`release` drops the copies and hands the freed pinned memory back to the OS; no view of them may outlive
    it. ``named`` must not be empty."""

    def __init__(self, named: Mapping[Any, torch.Tensor]) -> None:
        first = next(iter(named.values()))
        one_dtype = all(t.dtype == first.dtype for t in named.values())
        self._arena = HostArena({k: t.shape for k, t in named.items()}, first.dtype, pin=True) \
            if first.is_cuda and one_dtype else None
        self.tensors = {k: (self._arena.tensors[k] if self._arena else
                            torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)).copy_(t.detach())
                        for k, t in named.items()}

    def release(self) -> None:
        self.tensors = {}
        if self._arena is not None:
            self._arena.release()
            self._arena = None
            empty_host_cache()


def pageable(t: torch.Tensor) -> torch.Tensor:
    """``t`` in pageable host memory: a copy where ``t`` is pinned (so the pinned block can go back), else ``t.cpu()``."""
    return t.clone() if t.device.type == "cpu" and t.is_pinned() else t.cpu()


def empty_host_cache() -> None:
    """Return the CUDA caching host allocator's free pinned blocks to the OS (a no-op without CUDA)."""
    if not torch.cuda.is_available():
        return
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) \
        or getattr(torch._C, "_host_emptyCache", None)  # torch 2.11 has the private name only
    if empty is not None:
        empty()
