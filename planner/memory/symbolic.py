"""The step simulator run once with the micro-batch and the sequence length as symbols (issue 14 item 3, a prototype).

`symbolic_simulate(setup, counts)` drives the unchanged simulator (`step._simulate`: the family's model code,
blocks.py, ops.py, sim.py's autograd engine) with `batch_size = b` and `seq_len = s` as `Poly` values, polynomials in
(b, s). Every size the code computes from them is then a polynomial too, and every branch that depends on them is
taken as at a reference point (b0, s0), the setup's own values, with a *guard* recorded: a comparison's outcome
(`Poly.__gt__` and the others: `max`, `min`, `bool`, a kernel's choice by head size), a rounding (`-(-n // 512) * 512`
is a polynomial only where the rounded part does not move: `floor(R / 512) == q`), or a value the code needs as a plain
integer (`range`, `len`, a list repeated `batch` times: the guard `p == p(b0, s0)`, a specialization). A pass yields

- per phase and per segment (phase/scope), the live-bytes peak with its breakdown, as a set of candidate polynomials:
  the peak of a sequence of events is a maximum of polynomials, so the engine (`SymbolicEngine`) keeps each local
  maximum unless an earlier candidate is provably at least as large, or a later one provably larger, over the whole
  domain b >= 1, s >= 1 (`_signs`);
- the allocation log (the caching-allocator replay's input) as polynomials;
- the guards under which both hold.

For another (b, s), `SymbolicPass.holds(b, s)` evaluates the guards; where they hold, `evaluate(b, s)` is the concrete
simulator's result exactly (tests/test_symbolic.py compares every field); where one trips, the caller simulates
concretely. The caching-allocator replay (allocator.py) runs on the evaluated, concrete log: it is not symbolic.
benchmarks/symbolic_speed.py measures a pass against a concrete one and how many concrete simulations of the
Qwen2.5-VL table matrix one pass replaces (docs/speed.md, "The symbolic simulator: measured").

Representation. A polynomial is a Python int (a subclass, `Poly`) packing signed 64-bit slots: slot 0 holds its value
at the reference point, the others the integer coefficients of b**i * sigma**j (i, j <= 2), where the sequence length
is s = G * sigma + rho (G = 2048, rho = s0 mod G, every pass guarded `s mod G == rho`): sizes rounded to 512-byte
blocks, or a kernel's 128-token tiles, then stay polynomials with integer coefficients. Sums, differences and
multiples by integers, nearly all the simulator's arithmetic, are then one big-integer operation, so the symbolic pass
costs a small multiple of the concrete one (the measurement); products, floor divisions and comparisons decode the
slots (memoized on the packed value).
"""

from __future__ import annotations

import copy
import gc
from contextlib import contextmanager
from dataclasses import dataclass, field
from math import comb

from ..setup import TrainSetup
from . import sim, step

G = 2048  # the sequence-length granule: s = G * sigma + rho
_W = 64  # bits per slot
_FULL, _HALF, _MASK = 1 << _W, 1 << (_W - 1), (1 << _W) - 1
_DEG = 3  # exponents 0..2 of b and of sigma
_SLOTS = 1 + _DEG * _DEG
_CONST = 1 << _W  # the constant coefficient's unit
_ONE = 1 + _CONST  # the integer 1 as a packed polynomial: value 1, constant 1


def _shift(i: int, j: int) -> int:
    return _W * (1 + _DEG * i + j)


_EXPONENTS = [(i, j) for i in range(_DEG) for j in range(_DEG)]


_plain = int.__int__  # the packed value as a plain int (Poly's own operators are symbolic)


def _decode(raw: int) -> tuple[int, tuple]:
    """(value at the reference point, ((i, j, coefficient), ...) nonzero) of a packed polynomial."""
    raw = _plain(raw)
    got = _DECODED.get(raw)
    if got is None:
        rest = raw
        slots = []
        for _ in range(_SLOTS):
            low = rest & _MASK
            if low >= _HALF:
                low -= _FULL
            slots.append(low)
            rest = (rest - low) >> _W
        assert rest == 0, "a polynomial outside the packed range"
        got = slots[0], tuple((i, j, c) for (i, j), c in zip(_EXPONENTS, slots[1:]) if c)
        if len(_DECODED) > 1 << 17:
            _DECODED.clear()
        _DECODED[raw] = got
    return got


_DECODED: dict = {}


def _value(raw: int) -> int:
    """Slot 0 (the value at the reference point) alone."""
    low = _plain(raw) & _MASK
    return low - _FULL if low >= _HALF else low


def _encode(terms, value: int):
    """A Poly (or the int it is when constant) from ((i, j, c), ...) and its reference value."""
    if all(i == 0 and j == 0 for i, j, _ in terms):
        return value
    raw = value
    for i, j, c in terms:
        if i >= _DEG or j >= _DEG:
            raise OverflowError(f"b^{i} s^{j}: beyond the symbolic degree")
        raw += c << _shift(i, j)
    return Poly(raw)


class Poly(int):
    """An integer polynomial in (b, sigma), packed (see the module docstring). Python treats it as an int where C code
    reads it directly (so a list repeated by it is handled here, `__rmul__`); every method that would read the packed
    value as a number is overridden: arithmetic stays symbolic, comparisons decide at the reference point and guard."""

    __slots__ = ()

    # arithmetic: one big-integer operation
    def __add__(self, o):
        if type(o) is Poly:
            return Poly(int.__add__(self, o))
        if type(o) is int:
            return Poly(int.__add__(self, o * _ONE)) if o else self
        return NotImplemented

    __radd__ = __add__

    def __sub__(self, o):
        if type(o) is Poly:
            return Poly(int.__sub__(self, o))
        if type(o) is int:
            return Poly(int.__sub__(self, o * _ONE)) if o else self
        return NotImplemented

    def __rsub__(self, o):
        if type(o) is int:
            return Poly(int.__sub__(o * _ONE, self))
        return NotImplemented

    def __neg__(self):
        return Poly(int.__neg__(self))

    def __pos__(self):
        return self

    def __mul__(self, o):
        if type(o) is int:
            return Poly(int.__mul__(self, o)) if o else 0
        if type(o) is Poly:
            return _multiply(self, o)
        if isinstance(o, (list, tuple, str)):
            return repeat(o, self)
        return NotImplemented

    __rmul__ = __mul__

    def __floordiv__(self, o):
        if type(o) is int:
            return _floor_divide(self, o) if o > 0 else specialize(self) // o
        if type(o) is Poly:
            return _divide(self, o)
        return NotImplemented

    def __rfloordiv__(self, o):
        if type(o) is int:
            return o // specialize(self)
        return NotImplemented

    def __mod__(self, o):
        if type(o) in (int, Poly):
            return self - (self // o) * o
        return NotImplemented

    # comparisons: the outcome at the reference point, guarded unless it holds over the whole domain
    def __gt__(self, o):
        return _greater(self - o, True) if type(o) in (int, Poly) else NotImplemented

    def __ge__(self, o):
        return _greater(self - o, False) if type(o) in (int, Poly) else NotImplemented

    def __lt__(self, o):
        return _greater(o - self, True) if type(o) in (int, Poly) else NotImplemented

    def __le__(self, o):
        return _greater(o - self, False) if type(o) in (int, Poly) else NotImplemented

    def __eq__(self, o):
        return _zero(self - o) if type(o) in (int, Poly) else NotImplemented

    def __ne__(self, o):
        return (not _zero(self - o)) if type(o) in (int, Poly) else NotImplemented

    def __bool__(self):
        return not _zero(self)

    __hash__ = int.__hash__

    # a plain integer wanted: the value at the reference point, guarded `p == value`
    def __index__(self):
        return specialize(self)

    __int__ = __index__

    def __repr__(self) -> str:
        value, terms = _decode(self)
        text = " + ".join(f"{c}" + "".join(f"*{n}^{e}" if e > 1 else f"*{n}" for n, e in (("b", i), ("sigma", j)) if e)
                          for i, j, c in terms)
        return f"Poly({text}; {value} at the reference)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return format(specialize(self), spec)


def _specialized(name: str):
    """An int method on the specialized value (and operand): exotic uses (true division, powers, bit operations)."""
    method = getattr(int, name)

    def apply(self, *args):
        return method(specialize(self), *(specialize(a) if type(a) is Poly else a for a in args))

    apply.__name__ = name
    return apply


for _name in ("__truediv__", "__rtruediv__", "__pow__", "__rpow__", "__rmod__", "__divmod__", "__rdivmod__",
              "__and__", "__rand__", "__or__", "__ror__", "__xor__", "__rxor__", "__lshift__", "__rlshift__",
              "__rshift__", "__rrshift__", "__invert__", "__abs__", "__float__", "__round__", "__trunc__",
              "__floor__", "__ceil__", "bit_length", "to_bytes", "as_integer_ratio", "conjugate"):
    setattr(Poly, _name, _specialized(_name))


def _multiply(a: Poly, o: Poly):
    va, ta = _decode(a)
    vo, to = _decode(o)
    terms: dict = {}
    for i, j, c in ta:
        for k, m, e in to:
            terms[(i + k, j + m)] = terms.get((i + k, j + m), 0) + c * e
    return _encode(tuple((i, j, c) for (i, j), c in terms.items() if c), va * vo)


def _floor_divide(p: Poly, m: int):
    """floor(p / m), m > 0: each coefficient c = m * q + r (|r| < m, r of c's sign) splits p into m * Q + R, so
    floor(p / m) = Q + floor(R / m). R is 0 (a size in whole blocks), or a constant, or small: the rounding of a tensor
    of a few elements per sample (an int64 label per sequence, a boundary per image); floor(R / m) is then its value
    at the reference point, guarded `floor(R / m) == q`."""
    value = _value(p)
    key = (_plain(p) - value, m)
    template = _FLOORS.get(key)
    if template is None:
        _, terms = _decode(p)
        quotient, remainder = [], []
        for i, j, c in terms:
            q, r = divmod(c, m) if c >= 0 else (-(-c // m), -(-c % m))
            if q:
                quotient.append((i, j, q))
            if r:
                remainder.append((i, j, r))
        q_raw = 0
        for i, j, c in quotient:
            q_raw += c << _shift(i, j)
        variable = tuple((i, j, r) for i, j, r in remainder if i or j)
        constant = sum(r for i, j, r in remainder if not (i or j))
        template = _FLOORS[key] = (q_raw, variable, constant)
        if len(_FLOORS) > 1 << 16:
            _FLOORS.clear()
    q_raw, variable, constant = template
    result = value // m
    if not variable:
        floor_r = constant // m
    else:
        b0, sigma0 = _TRACE[-1].variables
        r_value = constant + sum(c * b0 ** i * sigma0 ** j for i, j, c in variable)
        floor_r = r_value // m
        _guard(("floor", variable + ((0, 0, constant),), m, floor_r))
    if q_raw == 0:
        return result  # only the rounded part: a constant under the guard
    return Poly(q_raw + floor_r * _CONST + result)


_FLOORS: dict = {}


def _divide(p: Poly, o: Poly):
    """p // o for p a polynomial multiple of o (tokens // seq, a view's numel // calls): the exact quotient; else
    both specialized."""
    vp, tp = _decode(p)
    vo, to = _decode(o)
    if len(to) == 1:  # a monomial divisor
        ((ki, kj, co),) = to
        quotient = []
        for i, j, c in tp:
            if i < ki or j < kj or c % co:
                break
            quotient.append((i - ki, j - kj, c // co))
        else:
            if vo and vp % vo == 0:
                return _encode(tuple(quotient), vp // vo)
    elif len(tp) == len(to):  # a constant multiple
        ratio = {(i, j): c for i, j, c in to}
        i, j, c = tp[0]
        if (i, j) in ratio and c % ratio[(i, j)] == 0:
            k = c // ratio[(i, j)]
            if all(ratio.get((i, j)) is not None and c == k * ratio[(i, j)] for i, j, c in tp) and vp == k * vo:
                return k
    return specialize(p) // specialize(o)


def repeat(items, times: Poly):
    """`items * times`: a list of per-sample entries (a sample's images or attention windows) repeated for each
    sample of the micro-batch, `Repeated`; other sequences specialized."""
    if isinstance(items, list):
        return Repeated(items, times)
    return items * specialize(times)


class Repeated:
    """`items * times` with a symbolic `times`: any concrete use (len, iteration, indexing) is the list at the
    reference point, with `times` specialized; the simulator's code that knows a repetition (model.py
    `_grouped_calls`, `_total`) asks it for its groups and its sum instead, symbolic in `times`."""

    def __init__(self, items: list, times) -> None:
        self.items, self.times = list(items), times

    def _concrete(self) -> list:
        return self.items * specialize(self.times) if type(self.times) is Poly else self.items * self.times

    def __len__(self) -> int:
        return len(self._concrete())

    def __iter__(self):
        return iter(self._concrete())

    def __getitem__(self, index):
        return self._concrete()[index]

    def __mul__(self, times):
        return Repeated(self.items, self.times * times)

    __rmul__ = __mul__

    def total(self):
        return sum(self.items) * self.times

    def grouped_calls(self, out_bytes, lse_bytes) -> list:
        """model.py `_grouped_calls` of the repeated list: the same groups, their counts symbolic in `times`."""
        from .model import _grouped_calls

        items, times = self.items, self.times
        distinct = set(items)
        if not (len(items) * times > 1) or not (min(sim.rounded(out_bytes(n)) for n in distinct) >= max(
                sim.rounded(lse_bytes(n)) for n in distinct)):
            if len(distinct) == 1:  # one run of equal lengths
                return [(items[0], len(items) * times)]
            return _grouped_calls(self._concrete(), out_bytes, lse_bytes)
        if not times > 1:  # one copy: the list itself (the counts below need every item before the last one)
            return _grouped_calls(self._concrete(), out_bytes, lse_bytes)
        # all but the last of `times` copies: every length, in the order it first appears, `times` times its count
        counts: dict = {}
        for length in items:
            counts[length] = counts.get(length, 0) + 1
        counts = {length: count * times for length, count in counts.items()}
        counts[items[-1]] -= 1
        return list(counts.items()) + [(items[-1], 1)]


# Guards ---------------------------------------------------------------------------------------------------------------


class Trace:
    """One symbolic pass in progress: its reference point and guards ({key: guard})."""

    def __init__(self, b0: int, s0: int) -> None:
        self.reference = (b0, s0)
        self.rho = s0 % G
        self.sigma_min = 1 if self.rho == 0 else 0  # s >= 1
        self.variables = (b0, (s0 - self.rho) // G)
        self.guards: dict = {}


_TRACE: list[Trace] = []


def _guard(key: tuple) -> None:
    guards = _TRACE[-1].guards
    if key not in guards:
        guards[key] = key


def specialize(p: Poly) -> int:
    """p's value at the reference point, guarded `p == value`."""
    value, terms = _decode(p)
    _guard(("eq", terms, value))
    return value


_SIGNS: dict = {}


def _signs(raw: int) -> tuple[bool, bool, bool, bool]:
    """(p > 0, p < 0, p >= 0, p <= 0) over b >= 1, sigma >= sigma_min, each True only where provable: the
    coefficients of p(1 + x, sigma_min + y), x, y >= 0, all of one sign. Memoized on the coefficients."""
    key = (_plain(raw) - _value(raw), _TRACE[-1].sigma_min)
    got = _SIGNS.get(key)
    if got is None:
        _, terms = _decode(raw)
        low = key[1]
        shifted: dict = {}
        for i, j, c in terms:
            for k in range(i + 1):
                for n in range(j + 1):
                    shifted[(k, n)] = shifted.get((k, n), 0) + c * comb(i, k) * comb(j, n) * low ** (j - n)
        const = shifted.get((0, 0), 0)
        nonneg = all(c >= 0 for c in shifted.values())
        nonpos = all(c <= 0 for c in shifted.values())
        got = (nonneg and const > 0, nonpos and const < 0, nonneg, nonpos)
        if len(_SIGNS) > 1 << 17:
            _SIGNS.clear()
        _SIGNS[key] = got
    return got


def _greater(diff, strict: bool) -> bool:
    """diff > 0 (strict) or diff >= 0 at the reference point, guarded unless provable over the domain."""
    if type(diff) is not Poly:
        return diff > 0 if strict else diff >= 0
    value = _value(diff)
    outcome = value > 0 if strict else value >= 0
    positive, negative, nonneg, nonpos = _signs(diff)
    if outcome:
        if not (positive if strict else nonneg):
            _guard(("gt" if strict else "ge", _decode(diff)[1]))
    elif not (nonpos if strict else negative):
        _guard(("ge" if strict else "gt", _decode(-diff)[1]))
    return outcome


def _zero(diff) -> bool:
    if type(diff) is not Poly:
        return diff == 0
    value, terms = _decode(diff)
    if not terms:  # identically zero
        return True
    if value == 0:
        _guard(("eq", terms, 0))
        return True
    if not any(_signs(diff)[:2]):
        _guard(("ne", terms))
    return False


def _poly_at(terms, b: int, sigma: int) -> int:
    total = 0
    for i, j, c in terms:
        total += c * b ** i * sigma ** j
    return total


def guard_holds(guard: tuple, b: int, sigma: int) -> bool:
    kind, terms = guard[0], guard[1]
    value = _poly_at(terms, b, sigma)
    if kind == "gt":
        return value > 0
    if kind == "ge":
        return value >= 0
    if kind == "ne":
        return value != 0
    if kind == "eq":
        return value == guard[2]
    return value // guard[2] == guard[3]  # "floor"


# The engine -----------------------------------------------------------------------------------------------------------


class SymbolicEngine(sim.Engine):
    """sim.Engine with symbolic sizes: the same accounting, but each segment's and phase's peak is a list of
    candidates (value, breakdown) in event order, one per local maximum (the state after a run of allocations, where
    the concrete engine snapshots its breakdown) that no other candidate provably dominates. The concrete peak at
    (b, s) is the first candidate with the largest value, as the concrete engine's strict `>` keeps the first."""

    def __init__(self, detail: bool = False) -> None:
        if detail:
            raise ValueError("the symbolic engine keeps no per-block detail")
        super().__init__(detail)
        self.segment_candidates: dict[str, list] = {}
        self.phase_candidates: dict[str, list] = {}
        self._open_run: str | None = None  # the segment of the allocations since the last free / segment change
        ENGINES.append(self)

    def _alloc(self, storage: sim.Storage) -> None:
        segment = self._segment
        if self._open_run is not None and self._open_run != segment:
            self._flush()
        n = storage.nbytes
        self.current += n
        self.by_category[storage.category] = self.by_category.get(storage.category, 0) + n
        if self.allocation_log is not None and n:
            _log(self.allocation_log, storage, n)
        self._open_run = segment

    def _flush(self) -> None:
        segment, self._open_run = self._open_run, None
        if segment is None:
            return
        phase = segment.split("/", 1)[0]
        if phase not in step.PHASES:
            return
        value, snapshot = self.current, None
        for table, key in ((self.segment_candidates, segment), (self.phase_candidates, phase)):
            candidates = table.get(key)
            if candidates is None:
                table[key] = candidates = []
            if _offer(candidates, value):
                if snapshot is None:
                    snapshot = dict(self.by_category)
                candidates.append((value, snapshot))

    def _free(self, storage: sim.Storage) -> None:
        if self._open_run is not None:
            self._flush()
        n = storage.nbytes
        if self.allocation_log is not None and n:
            _log(self.allocation_log, storage, 0)
        self.current -= n
        self.by_category[storage.category] -= n

    def _recategorize(self, storage: sim.Storage, category: str) -> None:
        if self._open_run is not None:
            self._flush()
        self.by_category[storage.category] -= storage.nbytes
        self.by_category[category] = self.by_category.get(category, 0) + storage.nbytes
        storage.category = category


def _log(log: list, storage: sim.Storage, nbytes) -> None:
    """sim._log_storage for symbolic sizes: a storage of `blocks` equal allocations logs each; a symbolic count
    (grouped attention calls, one per image of each sample) logs one `Blocks` entry, expanded when evaluated."""
    blocks = storage.blocks
    if type(blocks) is int and blocks == 1:
        log.append((id(storage), nbytes))
    elif type(blocks) is int:
        size = nbytes and storage.nbytes // blocks
        log.extend(((id(storage), j), size) for j in range(blocks))
    else:
        log.append(Blocks(id(storage), nbytes and storage.nbytes // blocks, blocks))


@dataclass
class Blocks:
    """`count` log entries ((key, j), size), j = 0 .. count - 1, with a symbolic count."""

    key: int
    size: object
    count: object


def _offer(candidates: list, value) -> bool:
    """Whether `value`, a later local maximum, can be the first largest somewhere: not when an earlier candidate is
    provably at least as large. Drops the earlier candidates it provably exceeds."""
    if type(value) is int and all(type(v) is int for v, _ in candidates):  # concrete: the running maximum alone
        if candidates and candidates[-1][0] >= value:
            return False
        candidates.clear()
        return True
    keep = []
    for v, snapshot in candidates:
        diff = v - value
        if type(diff) is int:
            if diff >= 0:
                return False
            continue  # provably exceeded
        signs = _signs(diff)
        if signs[2]:
            return False
        if not signs[1]:
            keep.append((v, snapshot))
    candidates[:] = keep
    return True


ENGINES: list[SymbolicEngine] = []


# A pass ---------------------------------------------------------------------------------------------------------------


def _compiled(x):
    """A value ready for evaluation: an int, or the polynomial's terms."""
    return x if type(x) is not Poly else _decode(x)[1]


def _at(x, b: int, sigma: int) -> int:
    return x if type(x) is int else _poly_at(x, b, sigma)


@dataclass
class SymbolicPass:
    """One symbolic simulation: what `step.simulate(setup, counts)` gives at any (b, s) where `guards` hold."""

    reference: tuple[int, int]
    rho: int  # s mod G: every (b, s) the pass serves has it
    guards: list
    segments: dict[str, list]  # segment -> [(value, breakdown)] candidates in event order, values compiled
    phases: dict[str, list]
    host_peak: object
    log: list | None = None
    stats: dict = field(default_factory=dict)

    def holds(self, b: int, s: int) -> bool:
        if s % G != self.rho or b < 1 or s < 1:
            return False
        sigma = (s - self.rho) // G
        return all(guard_holds(g, b, sigma) for g in self.guards)

    def evaluate(self, b: int, s: int) -> step.SimResult:
        """The concrete simulation's result at (b, s) (where `holds(b, s)`)."""
        sigma = (s - self.rho) // G

        def peak(candidates):
            best = None
            for value, breakdown in candidates:
                v = _at(value, b, sigma)
                if best is None or v > best[0]:
                    best = (v, breakdown)
            return best[0], {k: _at(x, b, sigma) for k, x in best[1].items()}

        phase_peaks, phase_breakdown = {}, {}
        for phase in step.PHASES:
            if phase in self.phases:
                total, breakdown = peak(self.phases[phase])
                phase_peaks[phase] = total
                phase_breakdown[phase] = {k: v for k, v in breakdown.items() if v}
        result = step.SimResult(phase_peaks, phase_breakdown, host_peak_bytes=_at(self.host_peak, b, sigma))
        result.segments = {key: peak(candidates) for key, candidates in self.segments.items()}
        return result

    def evaluate_log(self, b: int, s: int) -> list:
        """The allocation log at (b, s), as `sim.recording_allocations` records it."""
        sigma = (s - self.rho) // G
        log = []
        for entry in self.log:
            if type(entry) is Blocks:
                size = _at(entry.size, b, sigma)
                log.extend(((entry.key, j), size) for j in range(_at(entry.count, b, sigma)))
            else:
                key, n = entry
                log.append((key, n if type(n) is int else _poly_at(n, b, sigma)))
        return log


def symbolic_setup(setup: TrainSetup) -> TrainSetup:
    """`setup` with batch_size = b and seq_len = s = G * sigma + rho as polynomials (within a trace)."""
    trace = _TRACE[-1]
    b0, sigma0 = trace.variables
    symbolic = copy.copy(setup)  # TrainSetup's validation takes integers: set past it, as step.reference_setup does
    object.__setattr__(symbolic, "batch_size", _encode(((1, 0, 1),), b0))
    object.__setattr__(symbolic, "seq_len", _encode(((0, 1, G), (0, 0, trace.rho)), setup.seq_len))
    return symbolic


@contextmanager
def _tracing(b0: int, s0: int):
    trace = Trace(b0, s0)
    _TRACE.append(trace)
    engine_class = step.Engine
    step.Engine = SymbolicEngine  # step._engine builds the engine by this name
    ENGINES.clear()
    try:
        yield trace
    finally:
        step.Engine = engine_class
        _TRACE.pop()
        ENGINES.clear()


def _compiled_entry(entry):
    if type(entry) is Blocks:
        return Blocks(entry.key, _compiled(entry.size), _compiled(entry.count))
    return entry[0], _compiled(entry[1])


def _compile_candidates(table: dict) -> dict:
    return {key: [(_compiled(v), {k: _compiled(x) for k, x in breakdown.items()}) for v, breakdown in candidates]
            for key, candidates in table.items()}


def symbolic_simulate(setup: TrainSetup, counts: dict[str, int] | None = None, log: bool = False) -> SymbolicPass:
    """`step.simulate(setup, counts)` with the micro-batch and sequence length symbolic, referenced at the setup's
    own values; `log`: with the allocation log (as `sim.recording_allocations` gives it)."""
    builder = step.model_for(setup.model.family)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # frees by reference counting alone, as step.simulate runs it
    try:
        with _tracing(setup.batch_size, setup.seq_len) as trace:
            symbolic = symbolic_setup(setup)
            if log:
                with sim.recording_allocations() as logs:
                    step._simulate(builder, symbolic, counts, False)
            else:
                step._simulate(builder, symbolic, counts, False)
            if len(ENGINES) != 1:
                raise RuntimeError(f"expected one engine per pass, got {len(ENGINES)}")
            e = ENGINES.pop()
            result = SymbolicPass((setup.batch_size, setup.seq_len), trace.rho, list(trace.guards.values()),
                                  _compile_candidates(e.segment_candidates), _compile_candidates(e.phase_candidates),
                                  _compiled(e.host_peak_bytes),
                                  [_compiled_entry(entry) for entry in logs[0]] if log else None)
            del e
    finally:
        if gc_was_enabled:
            gc.enable()
    result.stats = {"guards": len(result.guards),
                    "candidates": sum(len(c) for c in result.segments.values()),
                    "specialized": sum(1 for g in result.guards if g[0] == "eq")}
    return result
