"""The caching-allocator model (planner/memory/allocator.py) against cases worked out by hand from
c10/cuda/CUDACachingAllocator.cpp (pytorch/pytorch 001074d2, `DeviceCachingAllocator`), against allocation logs of a
traced step (profiler/memtrack.py), and its use in `estimate` (planner/memory/estimate.py)."""

from dataclasses import replace

import pytest
from vlplan.planner.memory.allocator import (
    CachingAllocator,
    OutOfMemory,
    get_allocation_size,
    replay,
    round_size,
)

MIB = 2**20


def test_round_size_to_512_bytes():
    # round_size: `if (size < kMinBlockSize) return kMinBlockSize;` else kMinBlockSize * ceil(size / kMinBlockSize)
    assert [round_size(n) for n in (1, 511, 512, 513, 1024, 3 * MIB + 1)] == [512, 512, 512, 1024, 1024,
                                                                               3 * MIB + 512]


def test_segment_sizes():
    # get_allocation_size: `size <= kSmallSize` -> kSmallBuffer; `size < kMinLargeAlloc` -> kLargeBuffer;
    # else kRoundLarge * ceil(size / kRoundLarge)
    assert get_allocation_size(512) == 2 * MIB
    assert get_allocation_size(MIB) == 2 * MIB
    assert get_allocation_size(MIB + 512) == 20 * MIB
    assert get_allocation_size(10 * MIB - 512) == 20 * MIB
    assert get_allocation_size(10 * MIB) == 10 * MIB
    assert get_allocation_size(11 * MIB) == 12 * MIB


def test_pool_choice_small_and_large():
    # get_pool: `if (size <= kSmallSize) return small_blocks; else return large_blocks;`
    a = CachingAllocator()
    small = a.malloc(MIB)  # 1 MiB exactly is small: a 2 MiB segment
    assert small.pool is a.small_pool and a.reserved == 2 * MIB
    large = a.malloc(MIB + 1)  # rounds to 1 MiB + 512: large pool, a 20 MiB segment
    assert large.pool is a.large_pool and a.reserved == 22 * MIB
    # the small segment's free 1 MiB is never offered to a large request, nor the large one's to a small request
    assert a.malloc(1000).pool is a.small_pool and a.reserved == 22 * MIB


def test_small_pool_splits_down_to_512_bytes():
    # should_split: `if (block->pool->is_small ...) return remaining >= kMinBlockSize;`
    a = CachingAllocator()
    a.malloc(MIB)  # a 2 MiB small segment, 1 MiB remainder
    a.malloc(MIB - 512)  # from the remainder; the last 512 bytes are split off (>= kMinBlockSize)
    assert a.allocated == 2 * MIB - 512 and [k >> 64 for k in a.small_pool.keys] == [512]
    a.malloc(1)  # rounds to 512: best fit takes exactly the last block
    assert a.reserved == 2 * MIB and a.allocated == 2 * MIB


def test_request_of_1_to_10_mib_splits_a_20_mib_segment():
    # get_allocation_size -> kLargeBuffer; should_split (large pool): `remaining > kSmallSize` (17 MiB > 1 MiB)
    a = CachingAllocator()
    first = a.malloc(3 * MIB)
    assert (a.reserved, a.allocated, first.size) == (20 * MIB, 3 * MIB, 3 * MIB)
    assert [k >> 64 for k in a.large_pool.keys] == [17 * MIB]  # the remainder is cached in the large pool
    second = a.malloc(3 * MIB)  # get_free_block finds the 17 MiB remainder: no new segment
    assert a.reserved == 20 * MIB and second.address == first.address + 3 * MIB
    assert a.segments == 1


def test_large_block_not_split_when_remainder_is_at_most_1_mib():
    # should_split (large pool): `(size < max_split_size) && (remaining > kSmallSize)`: a remainder of exactly
    # 1 MiB is not split off, and alloc_found_block counts the whole block as allocated (stats.allocated_bytes)
    a = CachingAllocator()
    block = a.malloc(11 * MIB)  # a 12 MiB segment (kRoundLarge), remainder 1 MiB: whole block handed out
    assert (a.reserved, a.allocated, block.size) == (12 * MIB, 12 * MIB, 12 * MIB)
    a.free(block)
    block = a.malloc(10 * MIB - 512)  # reuses the 12 MiB block: remainder 2 MiB + 512 > 1 MiB, split
    assert (a.reserved, a.allocated, block.size) == (12 * MIB, 10 * MIB - 512, 10 * MIB - 512)


def test_best_fit_takes_the_smallest_free_block():
    # get_free_block: `pool.blocks.lower_bound(&p.search_key)` on a set ordered by BlockComparatorSize (size, then
    # address): the smallest cached block >= the request
    a = CachingAllocator()
    big, mid = a.malloc(16 * MIB), a.malloc(12 * MIB)
    big_address = big.address
    a.free(big)
    a.free(mid)
    assert a.reserved == 28 * MIB
    assert a.malloc(11 * MIB) is mid  # 12 MiB fits 11 MiB better than 16 MiB does (and is not split)
    taken = a.malloc(14 * MIB)  # only the 16 MiB block fits; its 2 MiB remainder is split off
    assert taken.address == big_address and a.reserved == 28 * MIB
    assert [k >> 64 for k in a.large_pool.keys] == [2 * MIB]


def test_equal_sizes_take_the_lowest_address():
    # BlockComparatorSize: equal sizes are ordered by address
    a = CachingAllocator()
    first, second = a.malloc(12 * MIB), a.malloc(12 * MIB)
    a.free(second)
    a.free(first)
    assert a.malloc(12 * MIB).address == first.address


def test_freed_blocks_merge_with_free_neighbours_in_their_segment():
    # free_block -> try_merge_blocks(block, prev) and (block, next): a freed block absorbs free neighbours
    a = CachingAllocator()
    x, y, z = a.malloc(3 * MIB), a.malloc(3 * MIB), a.malloc(3 * MIB)  # one 20 MiB segment, 11 MiB free tail
    a.free(x)
    a.free(z)  # merges with the 11 MiB tail
    assert sorted(k >> 64 for k in a.large_pool.keys) == [3 * MIB, 14 * MIB]
    a.free(y)  # merges with both neighbours: the whole segment is one free block again
    assert [k >> 64 for k in a.large_pool.keys] == [20 * MIB]
    whole = a.malloc(19 * MIB + 512)  # fits the merged block: no new segment (remainder 512 B is not split)
    assert a.reserved == 20 * MIB and whole.size == 20 * MIB


def test_no_merge_across_segments():
    # Blocks link (prev/next) only within the segment they were split from (alloc_found_block), so two adjacent
    # free segments never merge: a request larger than either needs a new cudaMalloc
    a = CachingAllocator()
    first, second = a.malloc(12 * MIB), a.malloc(12 * MIB)
    a.free(first)
    a.free(second)
    assert sorted(k >> 64 for k in a.large_pool.keys) == [12 * MIB, 12 * MIB]
    a.malloc(20 * MIB)
    assert a.reserved == 44 * MIB and a.segments == 3


def test_out_of_memory_frees_cached_segments_and_retries():
    # malloc: alloc_block fails -> release_available_cached_blocks (returns false: max_split_size is unlimited by
    # default) -> release_cached_blocks (cudaFree every cached block with no prev/next) -> alloc_block(isRetry)
    a = CachingAllocator(capacity_bytes=40 * MIB)
    first, second = a.malloc(12 * MIB), a.malloc(12 * MIB)
    a.free(first)
    a.free(second)
    a.malloc(30 * MIB)  # 24 + 30 > 40: both cached segments are released, then the 30 MiB segment fits
    assert (a.reserved, a.segments, a.retries) == (30 * MIB, 1, 1)


def test_split_segments_are_not_released_before_out_of_memory():
    # release_blocks: `else if (!block->prev && !block->next) release_block(...)`: a cached remainder of a segment
    # in use stays reserved, so the retry can still fail
    a = CachingAllocator(capacity_bytes=40 * MIB)
    a.malloc(3 * MIB)  # a 20 MiB segment, 17 MiB cached remainder
    cached = a.malloc(12 * MIB)
    a.free(cached)
    a.malloc(20 * MIB)  # 32 + 20 > 40: the 12 MiB segment is released (20 + 20 <= 40), the remainder is not
    assert a.reserved == 40 * MIB
    a.malloc(2 * MIB + 1)  # best fit: the cached 17 MiB remainder serves it before any cudaMalloc
    assert a.reserved == 40 * MIB
    with pytest.raises(OutOfMemory):  # 15 MiB left in the remainder: 18 MiB needs a new segment, none is released
        a.malloc(18 * MIB)
    assert a.retries == 1


def test_out_of_memory_event_is_reported():
    result = replay([(0, 12 * MIB), (1, 30 * MIB), (0, 0)], capacity_bytes=40 * MIB)
    assert result.oom and result.oom_event == 1
    assert result.reserved_peak_bytes == 12 * MIB


def test_max_split_size_keeps_oversize_blocks_whole():
    # max_split_size_mb (> 20 MiB, CUDAAllocatorConfig): get_free_block refuses a cached block >= max_split_size for a
    # smaller request (`(p.size() < max_split_size) && ((*it)->size >= max_split_size)`), and before the full release
    # release_available_cached_blocks cudaFrees the smallest cached oversize block >= max(request, max_split_size)
    a = CachingAllocator(capacity_bytes=50 * MIB, max_split_size_bytes=30 * MIB)
    big = a.malloc(40 * MIB)
    a.free(big)
    a.malloc(25 * MIB)  # may not take the cached 40 MiB block; 40 + 26 > 50, so that block is released first
    assert (a.reserved, a.segments, a.retries) == (26 * MIB, 1, 0)
    with pytest.raises(ValueError, match="max_split_size"):
        CachingAllocator(max_split_size_bytes=20 * MIB)


def test_expandable_segments_grow_one_segment_in_20_mib_pages():
    # Note [Expandable Segments]: large-pool pages are kLargeBuffer (20 MiB); find_expandable_block starts at the
    # free block before the unmapped tail, map_block maps only the missing pages and try_merge_blocks joins them
    a = CachingAllocator(expandable_segments=True)
    a.malloc(3 * MIB)  # maps one 20 MiB page; should_split (expandable): remainder >= 512 B -> 17 MiB free
    assert a.reserved == 20 * MIB
    a.malloc(30 * MIB)  # 17 MiB free + one more 20 MiB page = 37 MiB: 30 MiB taken, 7 MiB free
    assert (a.reserved, a.allocated) == (40 * MIB, 33 * MIB)
    plain = CachingAllocator()  # without expandable segments: a separate 30 MiB segment
    plain.malloc(3 * MIB)
    plain.malloc(30 * MIB)
    assert plain.reserved == 50 * MIB


def test_expandable_segments_split_any_remainder():
    # should_split: `if (block->pool->is_small || CUDAAllocatorConfig::expandable_segments()) return remaining >=
    # kMinBlockSize;` -- a 19.5 MiB request leaves a 0.5 MiB free block in its 20 MiB page
    a = CachingAllocator(expandable_segments=True)
    block = a.malloc(19 * MIB + MIB // 2)
    assert block.size == 19 * MIB + MIB // 2 and a.allocated == block.size
    assert a.malloc(MIB // 2 + 1) is not None and a.reserved == 20 * MIB + 2 * MIB  # small pool: its own page


def test_expandable_segments_unmap_free_pages_before_out_of_memory():
    # release_cached_blocks -> release_blocks -> unmap_block: whole free pages of expandable segments are unmapped
    a = CachingAllocator(capacity_bytes=40 * MIB, expandable_segments=True)
    block = a.malloc(30 * MIB)  # two 20 MiB pages
    a.free(block)
    assert a.reserved == 40 * MIB
    a.malloc(1000)  # the small pool needs a 2 MiB page: 42 > 40, so the large pool's free pages are unmapped
    assert (a.reserved, a.retries) == (2 * MIB, 1)
    with pytest.raises(OutOfMemory):  # the large pool must map two pages again: 2 + 40 > 40, and the small page
        a.malloc(30 * MIB)  # holds a live block, so it has no whole free page to unmap
    assert a.retries == 2


def test_replay_is_deterministic_and_reserved_bounds_allocated():
    events = []
    for i in range(200):
        events.append((i, (i * 7919) % (24 * MIB) + 1))
        if i % 3:
            events.append((i - 1, 0))
    first, second = replay(events), replay(events)
    assert first == second
    assert first.reserved_peak_bytes >= first.allocated_peak_bytes >= first.allocated_at_reserved_peak_bytes


class ReferenceAllocator:
    """A second, plain reading of the same rules of CUDACachingAllocator.cpp (default settings, one stream): every
    segment a list of [offset, size, allocated] blocks in address order, best fit by a linear scan over all free
    blocks of the pool (smallest size, then lowest address: `BlockComparatorSize`), no sorted sets or linked blocks.
    Segments get the model's synthetic addresses (increasing, 2 MiB aligned), which only break ties."""

    def __init__(self, capacity=None):
        self.capacity, self.segments, self.next_address = capacity, [], 2 * MIB
        self.reserved = self.allocated = self.reserved_peak = self.allocated_peak = 0
        self.retries = 0

    def malloc(self, nbytes):
        size = max(512, -(-nbytes // 512) * 512)  # round_size
        small = size <= MIB  # get_pool
        found = self._best_fit(small, size)
        if found is None:
            alloc = 2 * MIB if small else 20 * MIB if size < 10 * MIB else -(-size // (2 * MIB)) * 2 * MIB
            if self.capacity is not None and self.reserved + alloc > self.capacity:
                # release_cached_blocks: every cached block that is a whole segment, then one retry
                self.segments = [seg for seg in self.segments if not (len(seg["blocks"]) == 1
                                                                      and not seg["blocks"][0][2])]
                self.reserved = sum(seg["size"] for seg in self.segments)
                self.retries += 1
                if self.reserved + alloc > self.capacity:
                    raise OutOfMemory("reference")
            seg = {"base": self.next_address, "size": alloc, "small": small, "blocks": [[0, alloc, False]]}
            self.next_address += -(-alloc // (2 * MIB)) * 2 * MIB
            self.segments.append(seg)
            self.reserved += alloc
            self.reserved_peak = max(self.reserved_peak, self.reserved)
            found = (seg, 0)
        seg, index = found
        block = seg["blocks"][index]
        remaining = block[1] - size
        if (remaining >= 512) if small else (remaining > MIB):  # should_split
            seg["blocks"].insert(index + 1, [block[0] + size, remaining, False])
            block[1] = size
        block[2] = True
        self.allocated += block[1]
        self.allocated_peak = max(self.allocated_peak, self.allocated)
        return seg, block[0]

    def _best_fit(self, small, size):
        best = None
        for seg in self.segments:
            if seg["small"] != small:
                continue
            for index, (offset, length, used) in enumerate(seg["blocks"]):
                if not used and length >= size:
                    key = (length, seg["base"] + offset)
                    if best is None or key < best[0]:
                        best = (key, seg, index)
        return None if best is None else best[1:]

    def free(self, handle):
        seg, offset = handle
        blocks = seg["blocks"]
        index = next(i for i, b in enumerate(blocks) if b[0] == offset)
        blocks[index][2] = False
        self.allocated -= blocks[index][1]
        if index + 1 < len(blocks) and not blocks[index + 1][2]:  # try_merge_blocks with the next block
            blocks[index][1] += blocks.pop(index + 1)[1]
        if index > 0 and not blocks[index - 1][2]:  # and with the previous one
            blocks[index - 1][1] += blocks.pop(index)[1]


def reference_replay(events, capacity=None):
    allocator, live = ReferenceAllocator(capacity), {}
    for key, nbytes in events:
        if nbytes:
            live[key] = allocator.malloc(nbytes)
        elif key in live:
            allocator.free(live.pop(key))
    return allocator


def random_events(seed, count=3000, largest=48 * MIB):
    import random

    rng, events, live = random.Random(seed), [], []
    for i in range(count):
        if live and rng.random() < 0.45:
            events.append((live.pop(rng.randrange(len(live))), 0))
        else:
            # a mix of small-pool, 1-10 MiB and large requests, with many repeats (as a training step has)
            size = rng.choice([rng.randint(1, MIB), rng.randint(MIB + 1, 10 * MIB), rng.randint(10 * MIB, largest),
                               4 * MIB, 12 * MIB + 7, 700])
            events.append((i, size))
            live.append(i)
    return events


@pytest.mark.parametrize("seed", range(4))
def test_replay_equals_the_plain_reference(seed):
    """The model's sorted pools and linked blocks give what the plain reading of the rules gives, event for event."""
    events = random_events(seed)
    ours, reference = replay(events), reference_replay(events)
    assert (ours.reserved_peak_bytes, ours.allocated_peak_bytes, ours.reserved_final_bytes) == (
        reference.reserved_peak, reference.allocated_peak, reference.reserved)


def test_replay_under_capacity_equals_the_plain_reference():
    """Under a capacity the out-of-memory path (release the whole cached segments, retry once) matches the
    reference too: capacities from the unlimited reserved peak down, both where the retry saves the step and where
    the step runs out of memory."""
    events = random_events(7, count=2000, largest=24 * MIB)
    unlimited = replay(events)
    outcomes = set()
    for capacity in range(unlimited.reserved_peak_bytes - 2 * MIB, unlimited.allocated_peak_bytes, -8 * MIB):
        limited = replay(events, capacity)
        try:
            reference = reference_replay(events, capacity)
        except OutOfMemory:
            assert limited.oom
            outcomes.add("oom")
            continue
        assert not limited.oom and limited.retries == reference.retries >= 1
        assert (limited.reserved_peak_bytes, limited.allocated_peak_bytes) == (reference.reserved_peak,
                                                                              reference.allocated_peak)
        outcomes.add("retried")
    assert outcomes == {"oom", "retried"}


# Allocation logs recorded from the tracer ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traced_log():
    """The (allocate, free) sequence of a real traced step (two optimizer steps, fake tensors) of a tiny Qwen2-VL."""
    pytest.importorskip("transformers")
    from tiny import tiny_spec
    from vlplan.planner.setup import make_setup
    from vlplan.profiler.memtrack import recording_allocations
    from vlplan.profiler.trace import run_trace

    setup = make_setup(tiny_spec("qwen2-vl-2b"), method="lora", seq_len=256, image_size=(112, 112))
    with recording_allocations() as logs:
        traced = run_trace(setup)
    # memtrack's one-time probe of reference counts is a tracker too: the step's tracker logged the most
    return setup, traced, max(logs, key=len)


@pytest.mark.slow
def test_replay_of_a_traced_step(traced_log):
    _, traced, log = traced_log
    allocator = CachingAllocator()
    live: dict = {}
    live_bytes = live_peak = 0
    for key, nbytes in log:
        if nbytes:
            live[key] = (allocator.malloc(nbytes), nbytes)
            live_bytes += nbytes
            live_peak = max(live_peak, live_bytes)
        elif key in live:
            block, size = live.pop(key)
            allocator.free(block)
            live_bytes -= size
        assert allocator.reserved >= allocator.allocated >= live_bytes >= 0
    # the log's live bytes are the tracer's: the last step's peak (the tracer reports the steady state) is the log's
    assert live_peak == max(snap.total_bytes for snap in traced.phase_peaks.values())
    # torch's allocated_bytes counts whole blocks (a large block is not split for a remainder of <= 1 MiB)
    assert allocator.allocated_peak >= live_peak
    assert allocator.reserved_peak >= allocator.allocated_peak


@pytest.mark.slow
def test_replay_of_a_traced_step_equals_the_plain_reference(traced_log):
    """The tracer's log of a real (fake-tensor) training step through the model and through the plain reading of the
    rules: the same reserved and allocated peaks."""
    _, _, log = traced_log
    ours, reference = replay(log), reference_replay(log)
    assert (ours.reserved_peak_bytes, ours.allocated_peak_bytes, ours.reserved_final_bytes) == (
        reference.reserved_peak, reference.allocated_peak, reference.reserved)
    assert ours.reserved_peak_bytes > ours.allocated_peak_bytes  # the log is rich enough to cache something


@pytest.mark.slow
def test_replay_of_a_traced_step_is_deterministic(traced_log):
    _, _, log = traced_log
    assert replay(log) == replay(log)
    assert replay(log, expandable_segments=True) == replay(log, expandable_segments=True)


@pytest.mark.slow
def test_simulated_log_matches_the_traced_one(traced_log):
    """The estimator's allocation log (planner/memory/sim.py) replays like the tracer's: same live peak (the
    accuracy tests hold the simulation to the trace) and the reserved peak within the few segments by which the
    two orders may differ (the simulation allocates optimizer states up front, the trace at the first step)."""
    from vlplan.planner.memory.sim import recording_allocations
    from vlplan.planner.memory.step import simulate

    setup, traced, log = traced_log
    with recording_allocations() as logs:
        simulated = simulate(setup)
    assert len(logs) == 1
    ours, theirs = replay(logs[0]), replay(log)
    assert max(simulated.phase_peaks.values()) == pytest.approx(
        max(snap.total_bytes for snap in traced.phase_peaks.values()), rel=0.005)
    assert abs(ours.reserved_peak_bytes - theirs.reserved_peak_bytes) <= 4 * get_allocation_size(MIB + 1)


# The replay in `estimate` -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_setup():
    from vlplan.planner.registry import resolve
    from vlplan.planner.setup import make_setup

    return make_setup(resolve("qwen2-vl-2b"), method="lora", seq_len=512, image_size=(224, 224))


def test_estimate_peak_is_the_replayed_reserved_memory(small_setup):
    from vlplan.planner.memory import overheads
    from vlplan.planner.memory.estimate import (
        cublas_reserved_bytes,
        estimate,
        reserved_replay,
    )
    from vlplan.planner.memory.step import simulate_extrapolated

    result = estimate(small_setup)
    assert sum(result.breakdown_bytes.values()) == result.peak_bytes
    # the live-tensor peak is the simulation's, untouched by the replay
    assert result.allocated_peak_bytes == max(simulate_extrapolated(small_setup).phase_peaks.values())
    replayed, live_peak = reserved_replay(small_setup)
    assert live_peak == result.allocated_peak_bytes
    cublas = overheads.cublas_workspace_bytes(small_setup.gpu.name)
    assert cublas_reserved_bytes(small_setup.gpu.name) == 64 * MIB  # h100: two 32 MiB workspaces, two segments
    assert result.breakdown_bytes["cuda/allocator_reserve"] == (replayed.reserved_peak_bytes - live_peak
                                                                + 64 * MIB - cublas)
    assert result.peak_bytes == replayed.reserved_peak_bytes + 64 * MIB + overheads.CUDA_CONTEXT_BYTES
    assert result.allocator["reserved_peak_bytes"] == replayed.reserved_peak_bytes + 64 * MIB
    assert result.to_dict()["allocator"]["events"] == replayed.events


def test_cublas_workspaces_share_a_20_mib_segment_off_hopper():
    from vlplan.planner.memory.estimate import cublas_reserved_bytes

    assert cublas_reserved_bytes("a100-80g") == 20 * MIB  # 2 x 8.125 MiB: one kLargeBuffer segment


def test_estimate_with_expandable_segments(small_setup):
    from vlplan.planner.memory.estimate import estimate

    plain = estimate(small_setup)
    expandable = estimate(replace(small_setup, expandable_segments=True))
    assert expandable.allocator["expandable_segments"] and not plain.allocator["expandable_segments"]
    assert expandable.allocated_peak_bytes == plain.allocated_peak_bytes
    assert sum(expandable.breakdown_bytes.values()) == expandable.peak_bytes
    assert expandable.peak_bytes != plain.peak_bytes  # the setting reaches the replay


def test_estimate_near_capacity_replays_the_out_of_memory_retry(small_setup):
    """A GPU that holds the live tensors but not everything an unlimited allocator would cache: the allocator frees
    its cached segments and retries (`release_cached_blocks`), so the step fits with less reserved memory."""
    from vlplan.planner.memory import overheads
    from vlplan.planner.memory.estimate import estimate

    unlimited = estimate(small_setup)
    floor = unlimited.allocated_peak_bytes + 64 * MIB + overheads.CUDA_CONTEXT_BYTES
    assert unlimited.peak_bytes - floor > 256 * MIB  # cached memory worth squeezing
    for extra_mib in range(32, (unlimited.peak_bytes - floor) // MIB, 32):
        memory_mib = floor // MIB + extra_mib
        squeezed = estimate(replace(small_setup, gpu=replace(small_setup.gpu, memory_mib=memory_mib)))
        assert sum(squeezed.breakdown_bytes.values()) == squeezed.peak_bytes
        assert squeezed.allocator["retries"] >= 1  # the unlimited replay's reserved peak exceeds this GPU
        if squeezed.allocator["oom_event"] is not None:  # cached blocks split from segments in use stay reserved
            assert not squeezed.fits and squeezed.peak_bytes == unlimited.peak_bytes
            continue
        assert floor <= squeezed.peak_bytes <= memory_mib * MIB < unlimited.peak_bytes and squeezed.fits
        break
    else:
        raise AssertionError("no capacity between the live peak and the unlimited reserved peak fits")


def test_the_floor_bounds_the_peak_from_below(small_setup):
    """`peak_floor_bytes` (what plan and tables search on before replaying) is the peak without the reserve: never
    above it, for plain and expandable segments, one GPU and ZeRO on several."""
    from vlplan.planner.memory.estimate import estimate, peak_floor_bytes

    for setup in (small_setup, replace(small_setup, expandable_segments=True), replace(small_setup, batch_size=3),
                  replace(small_setup, method="full", language=small_setup.language.FULL, num_gpus=2, zero=2)):
        result = estimate(setup)
        assert peak_floor_bytes(setup) == result.peak_bytes - result.breakdown_bytes.get("cuda/allocator_reserve", 0)
        assert result.breakdown_bytes.get("cuda/allocator_reserve", 0) >= 0


def test_estimate_command_replays():
    import json

    from typer.testing import CliRunner

    from vlplan.cli.main import app

    def run(*args, env=None):
        result = CliRunner().invoke(app, ["estimate", "--model", "qwen2-vl-2b", "--seq-len", "512", "--image-size",
                                          "224x224", *args, "--json"], env=env)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    plain = run("--no-expandable-segments")
    expandable = run("--expandable-segments")
    assert plain["allocator"]["reserve"] == "replay" and not plain["allocator"]["expandable_segments"]
    assert plain["allocated_peak_bytes"] == expandable["allocated_peak_bytes"]
    assert plain["allocator"]["events"] > 1000 and expandable["allocator"]["expandable_segments"]
    assert plain["settings"]["expandable_segments"] is False and expandable["settings"]["expandable_segments"]
    assert sum(plain["breakdown_bytes"].values()) == plain["peak_bytes"]
    # the shell's PYTORCH_CUDA_ALLOC_CONF is read when no flag says
    from_env = run(env={"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128,expandable_segments:True"})
    assert from_env["peak_bytes"] == expandable["peak_bytes"]
    assert from_env["sources"]["expandable_segments"].startswith("PYTORCH_CUDA_ALLOC_CONF=")
    result = CliRunner().invoke(app, ["estimate", "--model", "qwen2-vl-2b"],
                                env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:yes"})
    assert result.exit_code == 2 and "expandable_segments takes True or False" in result.stderr


def test_llamafactory_torchrun_launch_turns_expandable_segments_on():
    """llamafactory/launcher.py: a torchrun launch (more than one GPU, or FORCE_TORCHRUN) sets
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless OPTIM_TORCH is off; one GPU keeps the shell's value."""
    from vlplan.planner.registry import resolve
    from vlplan.planner.resolve import expandable_segments_default
    from vlplan.planner.setup import make_setup

    one = make_setup(resolve("qwen2-vl-2b"), stack="llamafactory")
    two = replace(one, num_gpus=2)
    assert expandable_segments_default(one, {}) == (False, None)
    assert expandable_segments_default(two, {})[0] is True
    assert expandable_segments_default(one, {"FORCE_TORCHRUN": "1"})[0] is True
    assert expandable_segments_default(two, {"OPTIM_TORCH": "0"}) == (False, None)
    assert expandable_segments_default(replace(two, stack="vlplan"), {}) == (False, None)
    conf = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert expandable_segments_default(one, conf) == (True, "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    # the last setting wins, as in CUDAAllocatorConfig's parser
    off = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,expandable_segments:False"}
    assert expandable_segments_default(one, off)[0] is False


# Searches on the floor (plan, tables) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("growth", [0, 1, 5, 40])
def test_tables_search_finds_the_largest_fitting_micro_batch(monkeypatch, growth):
    """tables' micro-batch search (a guess from the replay-free floor, then full estimates at the boundary) gives the
    largest micro-batch whose full peak fits, for any budget: checked against a scan, with a synthetic peak whose
    reserve grows with the micro-batch by `growth` units (0: the floor plus a constant)."""
    from types import SimpleNamespace

    from vlplan.tables import compute

    def floor(setup):
        return 1000 + 100 * setup.batch_size

    def full(setup):
        b = setup.batch_size
        return floor(setup) + 30 + growth * b + (7 if b % 3 == 0 else 0)  # the reserve: >= 0, not monotone

    calls = []
    monkeypatch.setattr(compute, "peak_floor_bytes", floor)
    monkeypatch.setattr(compute, "estimate", lambda setup: calls.append(setup.batch_size) or SimpleNamespace(
        peak_bytes=full(setup)))
    monkeypatch.setattr(compute, "replace", lambda setup, batch_size: SimpleNamespace(batch_size=batch_size))
    one = SimpleNamespace(batch_size=1)
    for budget in range(1000, 1000 + 100 * (compute.MAX_MICRO_BATCH + 3) + growth * 20, 37):
        calls.clear()
        fitting = [b for b in range(1, compute.MAX_MICRO_BATCH + 1)
                   if full(SimpleNamespace(batch_size=b)) <= budget]
        expected = max(fitting) if fitting and fitting == list(range(1, max(fitting) + 1)) else (
            fitting[0] if fitting else None)
        if fitting and fitting != list(range(1, max(fitting) + 1)):
            continue  # not monotone at this budget: a search assumes it is
        got = compute._largest_micro_batch(one, SimpleNamespace(peak_bytes=full(one)), budget)
        assert got == expected, (budget, got, expected)
        assert len(set(calls)) <= 6  # full estimates (replays) only near the boundary
