"""A model of PyTorch's CUDA caching allocator, replaying an allocation sequence to get *reserved* memory.

`torch.cuda.max_memory_reserved` (what nvidia-smi shows beside the CUDA context, what ms-swift logs as
`memory(GiB)`, what decides an out-of-memory error) depends on the order and sizes of the allocations, not only on
the live bytes. This module replays a sequence of (allocate, free) events through the rules of
c10/cuda/CUDACachingAllocator.cpp (`DeviceCachingAllocator`, read at pytorch/pytorch commit 001074d2; the rules
below are unchanged from torch 2.1 through 2.13), one stream, default settings unless given:

- `round_size`: a request rounds up to a multiple of kMinBlockSize = 512 bytes (the `roundup_power2_divisions`
  option is off by default: c10/cuda/CUDAAllocatorConfig.h, an empty/zero divisions vector).
- `get_pool`: requests of <= kSmallSize (1 MiB) use the small pool, larger ones the large pool; blocks never move
  between pools.
- `get_allocation_size`: a new segment (cudaMalloc) is kSmallBuffer (2 MiB) for small requests, kLargeBuffer
  (20 MiB) for requests under kMinLargeAlloc (10 MiB), else the request rounded up to kRoundLarge (2 MiB).
- `get_free_block`: best fit, the smallest free block of the pool with size >= request (the pool is a std::set
  ordered by `BlockComparatorSize`: size, then address); with `max_split_size` set, a request under it never takes
  a block at or above it, and a request at or above it takes a block only if under request + kLargeBuffer. The
  default `max_split_size` is unlimited (SIZE_MAX), so both rules are inert by default.
- `should_split`: the remainder of the chosen block becomes a free block when the pool is small (or expandable
  segments are on) and the remainder is >= 512 bytes, or (large pool) when the request is under max_split_size and
  the remainder is > kSmallSize (1 MiB); otherwise the whole block is handed out (its size counts as allocated).
- `free_block` / `try_merge_blocks`: a freed block merges with its free neighbours of the same segment (`prev` /
  `next` are neighbours within one cudaMalloc'd segment only): segments never merge with each other.
- `malloc`'s out-of-memory path: when cudaMalloc fails (reserved + segment > capacity),
  `release_available_cached_blocks` (a no-op returning false unless max_split_size is set: it then frees cached
  oversize blocks, the smallest one large enough or several from the largest down), then `release_cached_blocks`
  (every cached block that is a whole segment is cudaFree'd; with expandable segments the free pages are unmapped)
  and one retry; if that fails, `OutOfMemoryError`.
- `expandable_segments:True` (Note [Expandable Segments], `ExpandableSegment`, `find_expandable_block`,
  `map_block`, `try_allocate_expandable_block`, `unmap_block`): each pool has one segment of reserved address space
  (9/8 of the device memory) mapped on demand in pages of kSmallBuffer (2 MiB, small pool) or kLargeBuffer (20 MiB,
  large pool); a request maps only the pages it needs at the lowest address where free + unmapped space fits it
  (so a free block at the end of the mapped range grows), splitting keeps any remainder >= 512 bytes, and best fit
  treats a free block followed by unmapped space as that much larger (`get_free_block`'s `expandable_size`). Pages
  stay mapped when freed (reserved) until the out-of-memory path unmaps the whole free pages.

Not modelled: other streams (`recordStream`, events: training on one stream frees immediately), CUDA graph private
pools, `garbage_collection_threshold` and `set_per_process_memory_fraction`, `roundup_power2_divisions`, the IPC
paths, and real cudaMalloc addresses: segments get increasing synthetic addresses, which only break ties between
equal-size free blocks (the real order depends on the driver).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass

from ..units import MIB

K_MIN_BLOCK_SIZE = 512  # kMinBlockSize: all sizes are rounded to at least 512 bytes
K_SMALL_SIZE = MIB  # kSmallSize: largest "small" allocation is 1 MiB
K_SMALL_BUFFER = 2 * MIB  # kSmallBuffer: "small" allocations are packed in 2 MiB blocks
K_LARGE_BUFFER = 20 * MIB  # kLargeBuffer: "large" allocations may be packed in 20 MiB blocks
K_MIN_LARGE_ALLOC = 10 * MIB  # kMinLargeAlloc: allocations between 1 and 10 MiB may use kLargeBuffer
K_ROUND_LARGE = 2 * MIB  # kRoundLarge: round up large allocations to 2 MiB

_SHIFT = 64  # free-block keys: size << _SHIFT | address, so one int orders like BlockComparatorSize
_ADDRESS_ALIGN = 2 * MIB  # cudaMalloc'd segments start on (at least) 2 MiB boundaries in this model


def round_size(nbytes: int) -> int:
    """`DeviceCachingAllocator::round_size` with roundup_power2_divisions off (the default)."""
    if nbytes < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    return K_MIN_BLOCK_SIZE * ((nbytes + K_MIN_BLOCK_SIZE - 1) // K_MIN_BLOCK_SIZE)


def get_allocation_size(size: int) -> int:
    """`DeviceCachingAllocator::get_allocation_size`: the cudaMalloc size of a new segment for a rounded request."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * ((size + K_ROUND_LARGE - 1) // K_ROUND_LARGE)


class OutOfMemory(Exception):
    """The model's `OutOfMemoryError`: the request could not be served after releasing cached blocks."""


class _Block:
    """`struct Block`: a range of one segment, free or allocated; `prev`/`next` are its neighbours in the segment."""

    __slots__ = ("address", "allocated", "cached_key", "mapped", "next", "pool", "prev", "segment", "size")

    def __init__(self, size: int, address: int, pool: _Pool, segment=None, mapped: bool = True) -> None:
        self.size, self.address, self.pool, self.segment, self.mapped = size, address, pool, segment, mapped
        self.prev = self.next = None
        self.allocated = False
        self.cached_key = 0  # its key in the pool's free set while it is there


class _ExpandableSegment:
    """`struct ExpandableSegment`: reserved address space [base, base + size) mapped in pages of `page` bytes."""

    __slots__ = ("base", "page", "size")

    def __init__(self, base: int, size: int, page: int) -> None:
        self.base, self.size, self.page = base, size, page


class _Pool:
    """`struct BlockPool`: the free (cached) blocks of one pool ordered by (size, address), and for expandable
    segments the unmapped ranges ordered by address."""

    __slots__ = ("blocks", "keys", "small", "unmapped")

    def __init__(self, small: bool) -> None:
        self.small = small
        self.keys: list[int] = []  # sorted keys of free mapped blocks
        self.blocks: dict[int, _Block] = {}  # key -> block
        self.unmapped: list[_Block] = []  # unmapped blocks, by address

    def insert(self, block: _Block) -> None:
        key = block.cached_key = (block.size << _SHIFT) | block.address
        insort(self.keys, key)
        self.blocks[key] = block

    def erase(self, block: _Block) -> None:
        key = block.cached_key  # the key it was inserted under (size and address may have changed since)
        del self.keys[bisect_left(self.keys, key)]
        del self.blocks[key]


@dataclass
class ReplayResult:
    """What a replay gives: the peak of reserved bytes, the allocated bytes at that moment and at their own peak,
    the segment count at the peak, and where the capacity was exceeded (None when it was not)."""

    reserved_peak_bytes: int
    allocated_at_reserved_peak_bytes: int
    allocated_peak_bytes: int
    reserved_final_bytes: int
    segments_at_peak: int
    events: int
    oom_event: int | None = None
    retries: int = 0  # allocations served only after releasing cached blocks (stats.num_alloc_retries)

    @property
    def oom(self) -> bool:
        return self.oom_event is not None

    @property
    def fragmentation_bytes(self) -> int:
        """Reserved minus allocated at the reserved peak: cached free memory the program could not use."""
        return self.reserved_peak_bytes - self.allocated_at_reserved_peak_bytes

    @property
    def cached_bytes(self) -> int:
        """`max_memory_reserved - max_memory_allocated`: what reserved memory adds on top of the allocated peak."""
        return self.reserved_peak_bytes - self.allocated_peak_bytes


class CachingAllocator:
    """`DeviceCachingAllocator` for one device and one stream. `capacity_bytes` is what cudaMalloc may take in all
    (None: unlimited); `max_split_size_bytes` None is the default (unlimited)."""

    def __init__(self, capacity_bytes: int | None = None, expandable_segments: bool = False,
                 max_split_size_bytes: int | None = None) -> None:
        if max_split_size_bytes is not None and max_split_size_bytes <= K_LARGE_BUFFER:
            # c10/cuda/CUDAAllocatorConfig.cpp parseMaxSplitSize: "max_split_size_mb too small, must be > 20"
            raise ValueError(f"max_split_size must be above {K_LARGE_BUFFER} bytes (20 MiB), as torch requires")
        self.capacity = capacity_bytes
        self.expandable = expandable_segments
        self.max_split = max_split_size_bytes if max_split_size_bytes is not None else 1 << 63
        self.small_pool, self.large_pool = _Pool(True), _Pool(False)
        self.reserved = 0  # stats.reserved_bytes (AGGREGATE).current
        self.allocated = 0  # stats.allocated_bytes (AGGREGATE).current
        self.reserved_peak = 0
        self.allocated_at_reserved_peak = 0
        self.allocated_peak = 0
        self.segments = 0
        self.segments_at_peak = 0
        self.retries = 0
        self._next_address = _ADDRESS_ALIGN
        self._peak_pending = False

    # malloc -------------------------------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> _Block:
        """`DeviceCachingAllocator::malloc`: raises OutOfMemory where torch raises OutOfMemoryError."""
        size = K_MIN_BLOCK_SIZE * ((nbytes + K_MIN_BLOCK_SIZE - 1) // K_MIN_BLOCK_SIZE) or K_MIN_BLOCK_SIZE  # round_size
        pool = self.small_pool if size <= K_SMALL_SIZE else self.large_pool  # get_pool
        block = self._get_free_block(pool, size)
        if block is None:
            alloc_size = get_allocation_size(size)
            block = self._alloc_block(pool, size, alloc_size)
            if block is None and self._release_available_cached_blocks(pool, size):
                block = self._alloc_block(pool, size, alloc_size)
            if block is None:
                self._release_cached_blocks()
                self.retries += 1
                block = self._alloc_block(pool, size, alloc_size)
            if block is None:
                raise OutOfMemory(f"tried to allocate {alloc_size} bytes with {self.reserved} reserved")
        if self._should_split(block, size):  # alloc_found_block
            remaining = block
            block = _Block(size, remaining.address, pool, remaining.segment)
            block.prev = remaining.prev
            if block.prev is not None:
                block.prev.next = block
            block.next = remaining
            remaining.prev = block
            remaining.address += size
            remaining.size -= size
            pool.insert(remaining)
        block.allocated = True
        self.allocated += block.size
        self.allocated_peak = max(self.allocated_peak, self.allocated)
        if self._peak_pending:  # the allocated bytes at the reserved peak include the block that raised it
            self.allocated_at_reserved_peak = self.allocated
            self._peak_pending = False
        return block

    def _get_free_block(self, pool: _Pool, size: int) -> _Block | None:
        """`get_free_block`: the smallest free block >= size (ties: lowest address), with the max_split_size rules
        and, for expandable segments, a block followed by unmapped space counted as big as it can grow."""
        keys = pool.keys
        i = bisect_left(keys, size << _SHIFT)
        if i == len(keys):
            return None
        block = pool.blocks[keys[i]]
        if self.expandable:
            def expandable_size(b: _Block) -> int:
                return b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)

            i += 1
            while i < len(keys):
                nxt = pool.blocks[keys[i]]
                if expandable_size(nxt) >= expandable_size(block):
                    break
                block = nxt
                i += 1
        if size < self.max_split <= block.size:  # do not return an oversized block for a smaller request
            return None
        if size >= self.max_split and block.size >= size + K_LARGE_BUFFER:  # oversize: round up within a limit
            return None
        pool.erase(block)
        return block

    def _should_split(self, block: _Block, size: int) -> bool:
        """`should_split`."""
        remaining = block.size - size
        if block.pool.small or self.expandable:
            return remaining >= K_MIN_BLOCK_SIZE
        return size < self.max_split and remaining > K_SMALL_SIZE

    def _raise_reserved(self, nbytes: int) -> None:
        self.reserved += nbytes
        if self.reserved > self.reserved_peak:
            self.reserved_peak = self.reserved
            self.segments_at_peak = self.segments
            self._peak_pending = True

    def _alloc_block(self, pool: _Pool, size: int, alloc_size: int) -> _Block | None:
        """`alloc_block`: a new segment from cudaMalloc (None when the capacity is exceeded), or for expandable
        segments `try_allocate_expandable_block`."""
        if self.expandable:
            return self._try_allocate_expandable_block(pool, size)
        if self.capacity is not None and self.reserved + alloc_size > self.capacity:
            return None
        address = self._next_address
        self._next_address += -(-alloc_size // _ADDRESS_ALIGN) * _ADDRESS_ALIGN
        block = _Block(alloc_size, address, pool)
        self.segments += 1
        self._raise_reserved(alloc_size)
        return block

    # free ---------------------------------------------------------------------------------------------------------
    def free(self, block: _Block) -> None:
        """`free` -> `free_block`: merge with free neighbours of the same segment and cache the result."""
        block.allocated = False
        self.allocated -= block.size
        pool = block.pool
        self._try_merge_blocks(block, block.prev, pool)
        self._try_merge_blocks(block, block.next, pool)
        pool.insert(block)

    @staticmethod
    def _try_merge_blocks(dst: _Block, src: _Block | None, pool: _Pool) -> None:
        """`try_merge_blocks`: absorb a free neighbour with the same mapped state."""
        if src is None or src.allocated or src.mapped != dst.mapped:
            return
        if src.mapped:
            pool.erase(src)
        else:
            pool.unmapped.remove(src)
        if dst.prev is src:  # [src dst]
            dst.address = src.address
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:  # [dst src]
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size

    # out-of-memory path -------------------------------------------------------------------------------------------
    def _release_available_cached_blocks(self, pool: _Pool, size: int) -> bool:
        """`release_available_cached_blocks`: with the default unlimited max_split_size it returns false at once;
        otherwise it cudaFrees the smallest cached oversize block large enough, or oversize blocks from the
        largest down until enough is released."""
        if self.max_split == 1 << 63 or self.expandable:
            return False  # (expandable blocks cannot be released one by one: release_block asserts on them)
        target = max(size, self.max_split)
        keys = pool.keys
        i = bisect_left(keys, target << _SHIFT)
        if i < len(keys):
            self._release_block(pool.blocks[keys[i]])
            return True
        released = 0
        while released < target and keys and pool.blocks[keys[-1]].size >= self.max_split:
            block = pool.blocks[keys[-1]]
            released += block.size
            self._release_block(block)
        return released >= target

    def _release_block(self, block: _Block) -> None:
        """`release_block`: cudaFree a cached whole segment."""
        block.pool.erase(block)
        self.reserved -= block.size
        self.segments -= 1

    def _release_cached_blocks(self) -> None:
        """`release_cached_blocks` -> `release_blocks` on the large then the small pool: every cached block that is
        a whole segment is freed; with expandable segments every free block's whole pages are unmapped."""
        for pool in (self.large_pool, self.small_pool):
            blocks = [pool.blocks[key] for key in pool.keys]
            for block in blocks:
                if self.expandable:
                    self._unmap_block(block)
                elif block.prev is None and block.next is None:
                    self._release_block(block)

    # expandable segments ------------------------------------------------------------------------------------------
    def _try_allocate_expandable_block(self, pool: _Pool, size: int) -> _Block | None:
        """`try_allocate_expandable_block`: map pages at the lowest address where free and unmapped space fit
        `size`, merging them with a free block before them; None when the capacity is exceeded."""
        candidate = self._find_expandable_block(pool, size)
        if not candidate.mapped and not self._map_block(candidate, min(candidate.size, size)):
            return None
        while candidate.size < size:
            following = candidate.next
            if not self._map_block(following, min(size - candidate.size, following.size)):
                return None
            candidate = following
        pool.erase(candidate)
        return candidate

    def _find_expandable_block(self, pool: _Pool, size: int) -> _Block:
        """`find_expandable_block`: the lowest-address unmapped block (with the free block before it) whose run of
        free and unmapped blocks holds `size`, else a new segment of address space."""
        def allocatable(b: _Block | None) -> bool:
            return b is not None and not b.allocated

        for block in pool.unmapped:
            start = block.prev if allocatable(block.prev) else block
            room, b = 0, start
            while room < size and allocatable(b):
                room += b.size
                b = b.next
            if room >= size:
                return start
        page = K_SMALL_BUFFER if pool.small else K_LARGE_BUFFER
        device = self.capacity if self.capacity is not None else 1 << 46
        span = -(-(device + device // 8) // page) * page  # 1 1/8 of the device memory, in pages
        segment = _ExpandableSegment(self._next_address, span, page)
        self._next_address += span
        block = _Block(span, segment.base, pool, segment, mapped=False)
        self._insert_unmapped(pool, block)
        return block

    @staticmethod
    def _insert_unmapped(pool: _Pool, block: _Block) -> None:
        unmapped = pool.unmapped
        i = 0
        while i < len(unmapped) and unmapped[i].address < block.address:
            i += 1
        unmapped.insert(i, block)

    def _map_block(self, to_map: _Block, size: int) -> bool:
        """`map_block` -> `ExpandableSegment::map`: map the pages covering [address, address + size), split off the
        rest of the unmapped block, merge with free neighbours and cache the result."""
        segment = to_map.segment
        offset = to_map.address - segment.base  # page-aligned: unmapped blocks start on a page boundary
        mapped = -(-(offset + size) // segment.page) * segment.page - offset
        if self.capacity is not None and self.reserved + mapped > self.capacity:
            return False  # cuMemCreate fails with CUDA_ERROR_OUT_OF_MEMORY
        pool = to_map.pool
        pool.unmapped.remove(to_map)
        to_map.mapped = True
        if mapped < to_map.size:
            remaining = _Block(to_map.size - mapped, to_map.address + mapped, pool, segment, mapped=False)
            remaining.prev, remaining.next = to_map, to_map.next
            if to_map.next is not None:
                to_map.next.prev = remaining
            to_map.next = remaining
            self._insert_unmapped(pool, remaining)
            to_map.size = mapped
        self._try_merge_blocks(to_map, to_map.prev, pool)
        self._try_merge_blocks(to_map, to_map.next, pool)
        pool.insert(to_map)
        self._raise_reserved(mapped)
        return True

    def _unmap_block(self, block: _Block) -> None:
        """`unmap_block` -> `ExpandableSegment::unmap`: unmap the whole pages inside a free block; what is left
        before and after them stays a free mapped block."""
        segment = block.segment
        page = segment.page
        begin = segment.base + -(-(block.address - segment.base) // page) * page
        end = segment.base + (block.address + block.size - segment.base) // page * page
        if begin >= end:
            return
        pool = block.pool
        pool.erase(block)
        before, after = begin - block.address, block.address + block.size - end
        if before > 0:
            head = _Block(before, block.address, pool, segment)
            head.prev, head.next = block.prev, block
            if block.prev is not None:
                block.prev.next = head
            block.prev = head
            pool.insert(head)
        if after > 0:
            tail = _Block(after, end, pool, segment)
            tail.prev, tail.next = block, block.next
            if block.next is not None:
                block.next.prev = tail
            block.next = tail
            pool.insert(tail)
        block.address, block.size, block.mapped = begin, end - begin, False
        self.reserved -= end - begin
        self._try_merge_blocks(block, block.prev, pool)
        self._try_merge_blocks(block, block.next, pool)
        self._insert_unmapped(pool, block)


def replay(events, capacity_bytes: int | None = None, expandable_segments: bool = False,
           max_split_size_bytes: int | None = None) -> ReplayResult:
    """Replay `events` through the allocator model: each event is `(key, nbytes)`, an allocation of `nbytes` > 0
    bytes under `key`, or `(key, 0)`, the free of the live allocation under `key` (a free of a key with no live
    allocation, e.g. a zero-byte tensor, which the allocator never sees, is skipped). Stops at the first
    out-of-memory, whose event index is `oom_event`.

    With the default settings (no expandable segments, unlimited max_split_size) it runs `_replay_default`, the same
    rules inlined into one loop (about 2x faster: the estimate's replay of a 7B step has some 27,000 events);
    `replay_model` runs every setting through `CachingAllocator`, and tests/test_allocator_fast.py holds the two
    equal, event for event, under capacities too."""
    if not expandable_segments and max_split_size_bytes is None:
        return _replay_default(events, capacity_bytes)
    return replay_model(events, capacity_bytes, expandable_segments, max_split_size_bytes)


def replay_model(events, capacity_bytes: int | None = None, expandable_segments: bool = False,
                 max_split_size_bytes: int | None = None) -> ReplayResult:
    """`replay` through the `CachingAllocator` object model (every setting)."""
    allocator = CachingAllocator(capacity_bytes, expandable_segments, max_split_size_bytes)
    live: dict = {}
    malloc, free = allocator.malloc, allocator.free
    oom_event = None
    count = 0
    for count, (key, nbytes) in enumerate(events, 1):
        if nbytes:
            try:
                live[key] = malloc(nbytes)
            except OutOfMemory:
                oom_event = count - 1
                break
        else:
            block = live.pop(key, None)
            if block is not None:
                free(block)
    return ReplayResult(allocator.reserved_peak, allocator.allocated_at_reserved_peak, allocator.allocated_peak,
                        allocator.reserved, allocator.segments_at_peak, count, oom_event, allocator.retries)


def _replay_default(events, capacity: int | None) -> ReplayResult:
    """`replay_model` with the default settings (one stream, no expandable segments, unlimited max_split_size), every
    step of `CachingAllocator.malloc` / `free` inlined: a block is a list [size, address, prev, next, allocated,
    small, key] (key: its pool key while cached), a pool a sorted list of keys (`size << _SHIFT | address`, so the
    first key >= `size << _SHIFT` is best fit, ties to the lowest address) and a dict key -> block. The rules, in
    order, as in the class: round_size, get_pool, get_free_block (best fit), alloc_block (a new segment of
    get_allocation_size, 2 MiB aligned synthetic addresses; over the capacity: release_cached_blocks, every cached
    whole segment of the large then the small pool, and one retry), should_split (small pool: a remainder >= 512
    bytes; large pool: > 1 MiB), the remainder cached; free_block merges with the free previous then next block of
    the segment."""
    small_keys: list[int] = []
    small_blocks: dict[int, list] = {}
    large_keys: list[int] = []
    large_blocks: dict[int, list] = {}
    live: dict = {}
    reserved = allocated = reserved_peak = allocated_at_peak = allocated_peak = 0
    segments = segments_at_peak = retries = 0
    next_address = _ADDRESS_ALIGN
    pending = False
    oom_event = None
    count = 0
    shift = _SHIFT
    for count, (key, nbytes) in enumerate(events, 1):
        if nbytes:
            size = -(-nbytes // K_MIN_BLOCK_SIZE) * K_MIN_BLOCK_SIZE or K_MIN_BLOCK_SIZE  # round_size
            small = size <= K_SMALL_SIZE  # get_pool
            if small:
                keys, blocks = small_keys, small_blocks
            else:
                keys, blocks = large_keys, large_blocks
            i = bisect_left(keys, size << shift)  # get_free_block: best fit
            if i < len(keys):
                block = blocks.pop(keys.pop(i))
            else:  # alloc_block: a new segment
                if small:
                    alloc_size = K_SMALL_BUFFER
                elif size < K_MIN_LARGE_ALLOC:
                    alloc_size = K_LARGE_BUFFER
                else:
                    alloc_size = -(-size // K_ROUND_LARGE) * K_ROUND_LARGE
                if capacity is not None and reserved + alloc_size > capacity:
                    # release_cached_blocks (large pool, then small): every cached whole segment, then one retry
                    for pool_keys, pool_blocks in ((large_keys, large_blocks), (small_keys, small_blocks)):
                        kept = []
                        for k in pool_keys:
                            b = pool_blocks[k]
                            if b[2] is None and b[3] is None:
                                del pool_blocks[k]
                                reserved -= b[0]
                                segments -= 1
                            else:
                                kept.append(k)
                        pool_keys[:] = kept
                    retries += 1
                    if reserved + alloc_size > capacity:
                        oom_event = count - 1
                        break
                block = [alloc_size, next_address, None, None, False, small, 0]
                next_address += -(-alloc_size // _ADDRESS_ALIGN) * _ADDRESS_ALIGN
                segments += 1
                reserved += alloc_size
                if reserved > reserved_peak:
                    reserved_peak = reserved
                    segments_at_peak = segments
                    pending = True
            remaining = block[0] - size
            if remaining >= K_MIN_BLOCK_SIZE if small else remaining > K_SMALL_SIZE:  # should_split
                prev = block[2]
                new = [size, block[1], prev, block, True, small, 0]
                if prev is not None:
                    prev[3] = new
                block[2] = new
                block[1] += size
                block[0] = remaining
                k = block[6] = remaining << shift | block[1]
                insort(keys, k)
                blocks[k] = block
                block = new
            else:
                block[4] = True
            allocated += block[0]
            if allocated > allocated_peak:
                allocated_peak = allocated
            if pending:  # the allocated bytes at the reserved peak include the block that raised it
                allocated_at_peak = allocated
                pending = False
            live[key] = block
        else:
            block = live.pop(key, None)
            if block is None:
                continue
            block[4] = False
            allocated -= block[0]
            if block[5]:
                keys, blocks = small_keys, small_blocks
            else:
                keys, blocks = large_keys, large_blocks
            prev = block[2]
            if prev is not None and not prev[4]:  # try_merge_blocks with the free previous block: [prev block]
                k = prev[6]
                del keys[bisect_left(keys, k)]
                del blocks[k]
                block[0] += prev[0]
                block[1] = prev[1]
                before = block[2] = prev[2]
                if before is not None:
                    before[3] = block
            nxt = block[3]
            if nxt is not None and not nxt[4]:  # and with the free next block: [block next]
                k = nxt[6]
                del keys[bisect_left(keys, k)]
                del blocks[k]
                after = block[3] = nxt[3]
                if after is not None:
                    after[2] = block
                block[0] += nxt[0]
            k = block[6] = block[0] << shift | block[1]
            insort(keys, k)
            blocks[k] = block
    return ReplayResult(reserved_peak, allocated_at_peak, allocated_peak, reserved, segments_at_peak, count,
                        oom_event, retries)
