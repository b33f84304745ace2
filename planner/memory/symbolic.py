"""The step simulator run once with the micro-batch and the sequence length as symbols (issue 14 item 3, a prototype).

`symbolic_simulate(setup, counts, log)` drives the unchanged simulator (`step._simulate`: the family's model code,
blocks.py, ops.py, sim.py's autograd engine) with `batch_size = b` and `seq_len = s` as `Poly` values. Every size the
code computes from them is then a polynomial too, and every branch that depends on them is taken as at a reference
point (b0, s0), the setup's own values, with a *guard* recorded unless it holds over the whole domain: a comparison's
outcome (`Poly.__gt__` and the others: `max`, `min`, `bool`, a kernel's choice by head size), a rounding, or a value
the code needs as a plain integer (`range`, `len`: the guard `p == p(b0, s0)`, a specialization). A pass yields

- per phase and per segment (phase/scope), the live-bytes peak with its breakdown, as a list of candidates: the peak
  of a sequence of events is a maximum of polynomials, so `SymbolicEngine` keeps each local maximum that can still be
  the first largest somewhere (`_offer`);
- the allocation log (the caching-allocator replay's input) with polynomial sizes;
- the guards under which both hold.

For another (b, s), `SymbolicPass.holds(b, s)` evaluates the guards; where they hold, `evaluate(b, s)` and
`evaluate_log(b, s)` are the concrete simulator's result and log exactly (tests/test_symbolic.py); where one trips,
the caller simulates concretely. The caching-allocator replay (allocator.py) runs on the evaluated, concrete log: it
is not symbolic. benchmarks/symbolic_speed.py measures a pass against a concrete one and how many concrete passes of
the Qwen2.5-VL table one pass replaces (docs/speed.md, "The symbolic simulator: measured").

Representation. A polynomial is an int subclass (`Poly`) packing signed 64-bit slots: slot 0 its value at the
reference point, then the integer coefficients of x**i * y**j (i, j <= 2) in the shifted variables x = b - 1 and
y = sigma - sigma_min, where s = G * sigma + rho (G = 2048, rho = s0 mod G: every pass serves one residue), then the
coefficients of up to `ATOMS` floor atoms. Over the domain x, y >= 0 a polynomial whose coefficients are all of one
sign has that sign, so most comparisons are decided for the whole domain by reading the slots, with no guard. Sums,
differences and integer multiples, nearly all the simulator's arithmetic, are one big-integer operation; products,
floor divisions and comparisons decode the slots (memoized on the packed value). A floor division keeps whole blocks
polynomial (a coefficient's multiple of the divisor) and turns the rest, the rounding of a small per-sample tensor,
into an atom floor(R / m), a term of its own evaluated at each point (`_floor_divide`).
"""

from __future__ import annotations

import copy
import gc
from contextlib import contextmanager
from dataclasses import dataclass, field
from math import gcd

from ..setup import TrainSetup
from . import sim, step

G = 2048  # the sequence-length granule: s = G * sigma + rho
_W = 64  # bits per slot
_FULL, _HALF, _MASK = 1 << _W, 1 << (_W - 1), (1 << _W) - 1
_DEG = 3  # exponents 0..2 of x = b - 1 and y = sigma - sigma_min
_MONOMIALS = _DEG * _DEG  # term index i * _DEG + j: x**i * y**j
ATOMS = 16  # term index _MONOMIALS + k: the k-th floor atom of the pass, floor(R_k / m_k)
_SLOTS = 1 + _MONOMIALS + ATOMS
_CONST = 1 << _W  # the constant coefficient's unit (term 0)
_ONE = 1 + _CONST  # the integer 1 as a packed polynomial: value 1, constant 1
_B, _SIGMA = _DEG, 1  # term indices of x and y

_plain = int.__int__  # the packed value as a plain int (Poly's own operators are symbolic)


def _decode(raw: int) -> tuple[int, tuple]:
    """(value at the reference point, ((term index, coefficient), ...) nonzero) of a packed polynomial."""
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
        got = slots[0], tuple((index, c) for index, c in enumerate(slots[1:]) if c)
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
    """A Poly (or the int it is when constant) from ((term index, c), ...) and its reference value."""
    if all(index == 0 for index, _ in terms):
        return value
    raw = value
    for index, c in terms:
        raw += c << (_W * (1 + index))
    return Poly(raw)


class Poly(int):
    """An integer polynomial in x = b - 1 and y = sigma - sigma_min (and atoms), packed (see the module docstring).
    Python treats it as an int where C code reads it directly (so a list repeated by it is handled here, `__rmul__`);
    every method that would read the packed value as a number is overridden: arithmetic stays symbolic, comparisons
    decide at the reference point and guard."""

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
        if o == 0 and type(o) is int and _plain(self) in _POSITIVE:  # a size: `size > 0` in every storage
            return True
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
        return _plain(self) in _POSITIVE or not _zero(self)

    __hash__ = int.__hash__

    # a plain integer wanted: the value at the reference point, guarded `p == value`
    def __index__(self):
        return specialize(self)

    __int__ = __index__

    def __repr__(self) -> str:
        value, terms = _decode(self)
        names = [("1", "y", "y^2"), ("x", "x*y", "x*y^2"), ("x^2", "x^2*y", "x^2*y^2")]
        text = " + ".join(f"{c}*{names[i // _DEG][i % _DEG] if i < _MONOMIALS else f'atom{i - _MONOMIALS}'}"
                          for i, c in terms)
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
    if any(index >= _MONOMIALS for index, _ in ta + to):  # an atom times a variable: not kept symbolic
        return specialize(a) * specialize(o)
    terms: dict = {}
    for x, c in ta:
        for y, e in to:
            i, j = x // _DEG + y // _DEG, x % _DEG + y % _DEG
            if i >= _DEG or j >= _DEG:
                return specialize(a) * specialize(o)
            terms[i * _DEG + j] = terms.get(i * _DEG + j, 0) + c * e
    return _encode(tuple((index, c) for index, c in terms.items() if c), va * vo)


def _floor_divide(p: Poly, m: int):
    """floor(p / m), m > 0: each coefficient c = m * q + r (|r| < m, r of c's sign) splits p into m * Q + R, so
    floor(p / m) = Q + floor(R / m). R is 0 (a size in whole 512-byte blocks, whole 128-token tiles), or a constant,
    or the rounding of a tensor of a few elements per sample (an int64 label per sequence, a boundary per image):
    then floor(R / m) is a new term of the pass, an *atom* (a quasi-polynomial: evaluated as floor(R / m) at each
    (b, s), bounded by (R - m + 1) / m and R / m where a comparison needs its sign). Past `ATOMS` atoms, its value at
    the reference point, guarded `floor(R / m) == q`."""
    value = _value(p)
    key = (_plain(p) - value, m)
    template = _FLOORS.get(key)
    if template is None:
        _, terms = _decode(p)
        q_raw, remainder = 0, []
        for index, c in terms:
            q, r = divmod(c, m) if c >= 0 else (-(-c // m), -(-c % m))
            q_raw += q << (_W * (1 + index))
            if r:
                remainder.append((index, r))
        variable = tuple((index, r) for index, r in remainder if index)
        constant = sum(r for index, r in remainder if not index)
        template = _FLOORS[key] = (q_raw, variable, constant)
        if len(_FLOORS) > 1 << 16:
            _FLOORS.clear()
    q_raw, variable, constant = template
    result = value // m
    if not variable:
        floor_r = constant // m
    else:
        atom = _TRACE[-1].atom(variable + ((0, constant),) if constant else variable, m)
        if atom is not None:
            return Poly(q_raw + (1 << (_W * (1 + atom))) + result)
        trace = _TRACE[-1]
        floor_r = (constant + sum(c * trace.values[index] for index, c in variable)) // m
        _guard(("floor", variable + ((0, constant),), m, floor_r))
    if q_raw == 0:
        return result  # only the rounded part: a constant under the guard
    return Poly(q_raw + floor_r * _CONST + result)


_FLOORS: dict = {}


def _divide(p: Poly, o: Poly):
    """p // o for p a polynomial multiple of o (tokens // seq, a view's numel // calls): the exact quotient, by long
    division on the leading terms (lexicographic in the exponents of x, then y); else both specialized."""
    vp, tp = _decode(p)
    vo, to = _decode(o)
    if vo and vp % vo == 0 and all(index < _MONOMIALS for index, _ in tp + to):
        rest = {divmod(index, _DEG): c for index, c in tp}
        divisor = {divmod(index, _DEG): c for index, c in to}
        lead = max(divisor)
        quotient: dict = {}
        while rest:
            top = max(rest)
            if top[0] < lead[0] or top[1] < lead[1] or rest[top] % divisor[lead]:
                break
            k, shift = rest[top] // divisor[lead], (top[0] - lead[0], top[1] - lead[1])
            quotient[shift] = quotient.get(shift, 0) + k
            for (i, j), c in divisor.items():
                key = (i + shift[0], j + shift[1])
                left = rest.get(key, 0) - k * c
                if left:
                    rest[key] = left
                else:
                    rest.pop(key, None)
        else:
            return _encode(tuple((i * _DEG + j, c) for (i, j), c in quotient.items() if c), vp // vo)
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
    """One symbolic pass in progress: its reference point, atoms and guards ({key: guard})."""

    def __init__(self, b0: int, s0: int) -> None:
        self.reference = (b0, s0)
        self.rho = s0 % G
        self.sigma_min = sigma_min(self.rho)
        x0, y0 = variables(b0, s0, self.rho)
        self.values = [x0 ** (index // _DEG) * y0 ** (index % _DEG) for index in range(_MONOMIALS)]
        self.atoms: list[tuple[tuple, int]] = []  # (R's terms, m): atom k is floor(R / m)
        self._atom_index: dict = {}
        self.guards: dict = {}
        self.signs: dict = {}  # _signs of polynomials with atoms (their bounds depend on this pass's atoms)

    def atom(self, remainder: tuple, m: int) -> int | None:
        """The term index of floor(remainder / m), made on first use; None when every atom slot is taken."""
        key = (remainder, m)
        index = self._atom_index.get(key)
        if index is None:
            if len(self.atoms) == ATOMS:
                return None
            index = self._atom_index[key] = _MONOMIALS + len(self.atoms)
            self.atoms.append(key)
            self.values.append(sum(c * self.values[i] for i, c in remainder) // m)
        return index


_TRACE: list[Trace] = []


def sigma_min(rho: int) -> int:
    """The least sigma: s = G * sigma + rho >= 1."""
    return 1 if rho == 0 else 0


def variables(b: int, s: int, rho: int) -> tuple[int, int] | None:
    """(x, y) = (b - 1, sigma - sigma_min) of (b, s), both >= 0; None where s mod G is not rho."""
    if s % G != rho or b < 1 or s < 1:
        return None
    return b - 1, (s - rho) // G - sigma_min(rho)


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
    """(p > 0, p < 0, p >= 0, p <= 0) over the domain x, y >= 0, each True only where provable: p's coefficients
    (over x = b - 1, y = sigma - sigma_min) all of one sign. An atom floor(R / m) is replaced by its lower bound
    (R - m + 1) / m or its upper bound R / m, whichever gives the bound of p sought (`_bounds`)."""
    key = _plain(raw) - _value(raw)
    got = _SIGNS.get(key)
    if got is None:
        trace = _TRACE[-1]
        got = trace.signs.get(key)
        if got is None:
            _, terms = _decode(raw)
            if all(index < _MONOMIALS for index, _ in terms):
                got = _coefficient_signs(terms, terms)
                if len(_SIGNS) > 1 << 17:
                    _SIGNS.clear()
                    _POSITIVE.clear()
                _SIGNS[key] = got
                if got[0]:
                    _POSITIVE.add(_plain(raw))
            else:
                low, high = _bounds(terms, trace)
                got = (False, False, False, False) if low is None else _coefficient_signs(low, high)
                trace.signs[key] = got
    return got


_POSITIVE: set = set()  # packed polynomials without atoms provably > 0 (sizes): the engine's most frequent test


def _coefficient_signs(low, high) -> tuple[bool, bool, bool, bool]:
    """(low > 0, high < 0, low >= 0, high <= 0) from the coefficients of a lower and an upper bound."""
    low_const = next((c for index, c in low if index == 0), 0)
    high_const = next((c for index, c in high if index == 0), 0)
    nonneg = all(c >= 0 for _, c in low)
    nonpos = all(c <= 0 for _, c in high)
    return nonneg and low_const > 0, nonpos and high_const < 0, nonneg, nonpos


def _bounds(terms, trace: Trace):
    """(lower, upper) monomial bounds of M * p, M the product of the divisors of p's atoms; (None, None) where an
    atom's R holds an atom itself."""
    scale = 1
    for index, _ in terms:
        if index >= _MONOMIALS:
            remainder, m = trace.atoms[index - _MONOMIALS]
            if any(i >= _MONOMIALS for i, _ in remainder):
                return None, None
            scale *= m
    low: dict = {}
    high: dict = {}
    for index, c in terms:
        if index < _MONOMIALS:
            low[index] = low.get(index, 0) + c * scale
            high[index] = high.get(index, 0) + c * scale
            continue
        remainder, m = trace.atoms[index - _MONOMIALS]
        k = c * (scale // m)
        for i, r in remainder:  # c * floor(R / m) in [c * (R - m + 1) / m, c * R / m] for c > 0 (reversed for c < 0)
            low[i] = low.get(i, 0) + k * r
            high[i] = high.get(i, 0) + k * r
        target = low if c > 0 else high
        target[0] = target.get(0, 0) - k * (m - 1)
    return tuple(low.items()), tuple(high.items())


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


def slot_values(x: int, y: int, atoms) -> list:
    """The value of every term at (x, y): the monomials, then the atoms in order (an atom may use earlier ones)."""
    values = [x ** (index // _DEG) * y ** (index % _DEG) for index in range(_MONOMIALS)]
    for remainder, m in atoms:
        values.append(sum(c * values[i] for i, c in remainder) // m)
    return values


def _at(x, values: list) -> int:
    if type(x) is int:
        return x
    total = 0
    for index, c in x:
        total += c * values[index]
    return total


def guard_holds(guard: tuple, values: list) -> bool:
    kind = guard[0]
    value = _at(guard[1], values)
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
    provably at least as large. Drops the earlier candidates it provably exceeds, and those left under a chord
    (`_under_chord`)."""
    if type(value) is int and all(type(v) is int for v, _ in candidates):  # concrete: the running maximum alone
        if candidates and candidates[-1][0] >= value:
            return False
        candidates.clear()
        return True
    keep = []
    for candidate in candidates:
        diff = candidate[0] - value
        if _sign(diff, True):  # earlier >= new everywhere: the earlier one is the first largest
            return False
        if not _sign(-diff, False):  # unless new > earlier everywhere
            keep.append(candidate)
    while len(keep) >= 2 and _under_chord(keep[-2][0], keep[-1][0], value):
        keep.pop()
    candidates[:] = keep
    return True


_BIAS = sum(_HALF << (_W * k) for k in range(_SLOTS))  # every slot + 2**63: no borrows, each sign in its bit 63
_MONOMIAL_SIGNS = sum(_HALF << (_W * (1 + k)) for k in range(_MONOMIALS))
_ATOMS_ZERO = sum(_HALF << (_W * k) for k in range(ATOMS))  # the atom slots of a biased value whose atoms are 0


def _sign(diff, weak: bool) -> bool:
    """diff >= 0 (weak) or diff > 0 provably over the domain. The common case, equal atoms and coefficients of one
    sign, is read off the packed slots at once; the rest goes through `_signs`."""
    if type(diff) is int:
        return diff >= 0 if weak else diff > 0
    biased = _plain(diff) + _BIAS
    if biased >> (_W * (1 + _MONOMIALS)) == _ATOMS_ZERO:
        if biased & _MONOMIAL_SIGNS != _MONOMIAL_SIGNS:
            return False  # a negative coefficient, no atom: not provable
        return weak or (biased >> _W) & _MASK > _HALF
    return _signs(diff)[2 if weak else 0]


_CHORD_LIMIT = 1 << 8


def _under_chord(a, b, new) -> bool:
    """b <= (p * a + q * new) / (p + q) over the whole domain, p / q the ratio of the steps b - a and new - b at the
    reference point (exact for an affine chain, as the peaks over a stack of layers are: gradients accumulate as
    activations are freed). Then b is never the first largest: where it reaches the chord's maximum, the three are
    equal and a, earlier, is first."""
    v_a = a if type(a) is int else _value(a)
    v_b = b if type(b) is int else _value(b)
    v_new = new if type(new) is int else _value(new)
    d1, d2 = v_b - v_a, v_new - v_b
    if not d1 or not d2 or (d1 > 0) != (d2 > 0):
        return False
    g = gcd(d1, d2)
    p, q = abs(d2 // g), abs(d1 // g)
    if p > _CHORD_LIMIT or q > _CHORD_LIMIT:
        return False
    return _sign(a * p + new * q - b * (p + q), True)


ENGINES: list[SymbolicEngine] = []


class SymbolicStorage(sim.Storage):
    """sim.Storage's size, `blocks * rounded(nbytes / blocks)`, without its shortcut for one block (`nbytes // 1` is
    nbytes): a symbolic block count (grouped attention calls, b - 1 of them) then takes one branch at b = 2 and
    above. Used by the engine during a trace (`_tracing`); the exactness tests hold it to sim.Storage."""

    __slots__ = ()

    def __init__(self, engine, nbytes, category: str, owner: str, blocks=1) -> None:
        self.engine, self.category, self.owner, self.blocks = engine, category, owner, blocks
        size = nbytes // blocks
        self.nbytes = blocks * (-(-size // sim.BLOCK_BYTES) * sim.BLOCK_BYTES) if size > 0 else 0
        engine._alloc(self)


# A pass ---------------------------------------------------------------------------------------------------------------


def _compiled(x):
    """A value ready for evaluation: an int, or the polynomial's terms."""
    return x if type(x) is not Poly else _decode(x)[1]


@dataclass
class SymbolicPass:
    """One symbolic simulation: what `step.simulate(setup, counts)` gives at any (b, s) where `guards` hold."""

    reference: tuple[int, int]
    rho: int  # s mod G: every (b, s) the pass serves has it
    atoms: list  # (R's terms, m): floor(R / m), in order
    guards: list
    segments: dict[str, list]  # segment -> [(value, breakdown)] candidates in event order, values compiled
    phases: dict[str, list]
    host_peak: object
    log: list | None = None
    stats: dict = field(default_factory=dict)

    def values(self, b: int, s: int) -> list | None:
        """The terms' values at (b, s), or None where the pass's guards do not all hold."""
        xy = variables(b, s, self.rho)
        if xy is None:
            return None
        values = slot_values(*xy, self.atoms)
        return values if all(guard_holds(g, values) for g in self.guards) else None

    def holds(self, b: int, s: int) -> bool:
        return self.values(b, s) is not None

    def evaluate(self, b: int, s: int) -> step.SimResult:
        """The concrete simulation's result at (b, s) (where `holds(b, s)`)."""
        values = slot_values(*variables(b, s, self.rho), self.atoms)

        def peak(candidates):
            best = None
            for value, breakdown in candidates:
                v = _at(value, values)
                if best is None or v > best[0]:
                    best = (v, breakdown)
            return best[0], {k: _at(x, values) for k, x in best[1].items()}

        phase_peaks, phase_breakdown = {}, {}
        for phase in step.PHASES:
            if phase in self.phases:
                total, breakdown = peak(self.phases[phase])
                phase_peaks[phase] = total
                phase_breakdown[phase] = {k: v for k, v in breakdown.items() if v}
        result = step.SimResult(phase_peaks, phase_breakdown, host_peak_bytes=_at(self.host_peak, values))
        result.segments = {key: peak(candidates) for key, candidates in self.segments.items()}
        return result

    def evaluate_log(self, b: int, s: int) -> list:
        """The allocation log at (b, s), as `sim.recording_allocations` records it."""
        values = slot_values(*variables(b, s, self.rho), self.atoms)
        sizes: dict = {}  # a size's terms (one tuple per distinct polynomial, `_decode`'s memo) -> its value here
        log = []
        append = log.append
        for entry in self.log:
            if type(entry) is Blocks:
                size = _at(entry.size, values)
                log.extend(((entry.key, j), size) for j in range(_at(entry.count, values)))
                continue
            n = entry[1]
            if type(n) is int:
                append(entry)
                continue
            size = sizes.get(id(n))
            if size is None:
                size = sizes[id(n)] = _at(n, values)
            append((entry[0], size))
        return log


def symbolic_setup(setup: TrainSetup) -> TrainSetup:
    """`setup` with batch_size = b and seq_len = s = G * sigma + rho as polynomials (within a trace)."""
    trace = _TRACE[-1]
    symbolic = copy.copy(setup)  # TrainSetup's validation takes integers: set past it, as step.reference_setup does
    # b = 1 + x, s = G * (sigma_min + y) + rho
    object.__setattr__(symbolic, "batch_size", _encode(((0, 1), (_B, 1)), setup.batch_size))
    object.__setattr__(symbolic, "seq_len", _encode(((0, G * trace.sigma_min + trace.rho), (_SIGMA, G)),
                                                   setup.seq_len))
    return symbolic


@contextmanager
def _tracing(b0: int, s0: int):
    trace = Trace(b0, s0)
    _TRACE.append(trace)
    engine_class, storage_class = step.Engine, sim.Storage
    step.Engine = SymbolicEngine  # step._engine builds the engine by this name, Engine.new its storages by this one
    sim.Storage = SymbolicStorage
    ENGINES.clear()
    try:
        yield trace
    finally:
        step.Engine, sim.Storage = engine_class, storage_class
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
            result = SymbolicPass((setup.batch_size, setup.seq_len), trace.rho, list(trace.atoms),
                                  list(trace.guards.values()),
                                  _compile_candidates(e.segment_candidates), _compile_candidates(e.phase_candidates),
                                  _compiled(e.host_peak_bytes),
                                  [_compiled_entry(entry) for entry in logs[0]] if log else None)
            del e
    finally:
        if gc_was_enabled:
            gc.enable()
    result.stats = {"guards": len(result.guards),
                    "candidates": sum(len(c) for c in result.segments.values()), "atoms": len(result.atoms),
                    "equalities": sum(1 for g in result.guards if g[0] == "eq")}
    return result


# Holding a symbolic pass to the concrete simulator (tests/test_symbolic.py, benchmarks/symbolic_speed.py) -----------


def concrete_pass(setup: TrainSetup, counts: dict[str, int] | None = None, logged: bool = False):
    """A fresh concrete `step.simulate(setup, counts)` and, with `logged`, its allocation log as it stands when the
    pass returns (gc off: the engine's reference cycles are not collected meanwhile, as in the estimate's replay)."""
    was = gc.isenabled()
    gc.disable()
    try:
        if not logged:
            return step.simulate(setup, counts), None
        with sim.recording_allocations() as logs:
            result = step.simulate(setup, counts)
        return result, list(logs[0])
    finally:
        if was:
            gc.enable()


def canonical_log(log) -> list:
    """The log with its keys (storage ids) renumbered by first use: equal for equal allocation sequences."""
    numbers, out = {}, []
    for key, size in log:
        if size:
            numbers[key] = len(out)
            out.append((numbers[key], size))
        else:
            out.append((numbers.pop(key), 0))
    return out


def same_result(a, b) -> bool:
    """Two simulations agree on every phase and segment peak, their breakdowns and the host peak."""
    return (a.phase_peaks == b.phase_peaks and a.phase_breakdown == b.phase_breakdown and a.segments == b.segments
            and a.host_peak_bytes == b.host_peak_bytes)
