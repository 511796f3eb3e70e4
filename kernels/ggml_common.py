"""What GGML's block types share (ggml-quants.c's helper functions): ``nearest_int``, the signed
extreme of a group, the scale searches ``make_qx_quants`` and ``make_qkx2/3_quants``, the
importance weights of the ``*_impl`` quantizers, and the loading of one block.

All arithmetic is float32 in GGML's evaluation order, without fused multiply-add (numba does not
contract without ``fastmath``; GGML's base library is built without FMA on x86-64), every sum
sequential.
"""

import numpy as np
from qstrat.kernels.decode import FLOAT32_INFINITY_BITS, magnitude_bits, to_float32
from qstrat.kernels.half import ROUND_MAGIC
from qstrat.kernels.jit import kernel
from qstrat.kernels.layout import U64

GROUP_MAX_EPS = np.float32(1e-15)  # GGML: a group whose largest magnitude is below this is all zeros
BLOCKS_PER_TASK = 16  # blocks one parallel task quantizes with one set of scratch arrays


@kernel(inline="always")
def nearest_int(value):
    """GGML's nearest_int: ties to even through the float32 bits of value + 1.5 * 2**23 (for
    |value| beyond 2**22 the same bits give the same garbage GGML gets)."""
    bits = np.float32(value + ROUND_MAGIC).view(np.int32)
    return np.int64(bits & np.int32(0x007FFFFF)) - np.int64(0x00400000)


@kernel(inline="always")
def inverse_scale(d):
    """GGML's ``d ? 1.0f/d : 0.0f`` (a NaN d is true), as a select."""
    return np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)


@kernel(inline="always")
def signed_extreme(x):
    """GGML's ``max`` and ``amax`` of make_qx_quants and the like: the first value of largest
    magnitude, sign kept, and that magnitude (both 0 if all are zeros; NaN is passed over)."""
    amax = np.float32(0.0)
    extreme = np.float32(0.0)
    for i in range(U64(x.shape[0])):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            extreme = x[i]
    return extreme, amax


@kernel(inline="always")
def load_block(x, b, xb, out):
    """Block ``b`` of ``x`` (rows of whole blocks of ``len(xb)`` values, blocks in row-major order)
    into ``xb`` as float32, in one branch-free pass; returns the block's first column and whether
    it holds a NaN or infinity, in which case its bytes ``out[b]`` are zeroed (the caller refuses it)."""
    n = xb.shape[0]
    blocks_per_row = x.shape[1] // n
    r = b // blocks_per_row
    start = (b - r * blocks_per_row) * n
    # a 1-D slice: indexed as x[r, start + j] the loop did not vectorise (2.6x slower for float32)
    values = x[r, start : start + n]
    bad = np.uint32(0)
    for j in range(n):
        v = to_float32(values[j])
        xb[j] = v
        bad |= np.uint32(magnitude_bits(v) >= FLOAT32_INFINITY_BITS)
    if bad:
        out[b, :] = 0
    return start, bad != np.uint32(0)


@kernel
def sum_squares(xb):
    """sum(x**2) over a block, a sequential float32 sum as GGML's loop."""
    total = np.float32(0.0)
    for j in range(xb.shape[0]):
        total += xb[j] * xb[j]
    return total


@kernel
def importance_weights(x, qw, sigma2, weight):
    """weight[l] = qw[l] * sqrtf(sigma2 + x[l]**2) (GGML's *_impl); returns their sequential sum."""
    total = np.float32(0.0)
    for l in range(x.shape[0]):
        weight[l] = qw[l] * np.float32(np.sqrt(sigma2 + x[l] * x[l]))
    for l in range(x.shape[0]):
        total += weight[l]
    return total


# make_qx_quants' 19 trial scales (steps -9..9) side by side, padded to whole 8-float vectors
_TRIALS = 19
_LANES = 24


@kernel
def make_qx_quants(xb, weight, nmax, codes):
    """GGML's make_qx_quants with weights (rmse_type 1): codes[i] = l + nmax; returns d.

    GGML tries 19 scales one after the other, each a sequential float32 sum over the group.
    The sums of different trials do not depend on each other, so here they run side by side,
    one trial per vector lane (lane s: step s - 9, the first try being step 0): each lane still
    adds its terms one after the other in GGML's order, so every sum is bit for bit GGML's, but
    the 19 dependency chains overlap instead of following each other.  The trials are then
    compared in GGML's order."""
    n = xb.shape[0]
    extreme, amax = signed_extreme(xb)
    if amax < GROUP_MAX_EPS:
        codes[:n] = 0
        return np.float32(0.0)
    fmax = np.float32(nmax)
    low = np.int32(-nmax)
    high = np.int32(nmax - 1)
    lanes = np.empty((3, _LANES), dtype=np.float32)  # per trial: inverse scale, sum l*w*x, sum l*l*w
    for s in range(U64(_LANES)):
        step = np.float32(np.int32(min(s, U64(_TRIALS - 1)))) - np.float32(9.0)  # padding repeats step 9
        lanes[0, s] = -(fmax + np.float32(0.1) * step) / extreme  # step 0: -nmax / max, as GGML's first try
        lanes[1, s] = np.float32(0.0)
        lanes[2, s] = np.float32(0.0)
    for i in range(U64(n)):
        xi = xb[i]
        wi = weight[i]
        wxi = wi * xi  # GGML's w*x[i]*l is (w*x[i])*l
        for s in range(U64(_LANES)):  # no branch: vectorised across the trials
            bits = np.float32(lanes[0, s] * xi + ROUND_MAGIC).view(np.int32)
            l = np.int32(np.int32(bits & np.int32(0x007FFFFF)) - np.int32(0x00400000))
            fl = np.float32(max(low, min(high, l)))
            lanes[1, s] += wxi * fl
            lanes[2, s] += wi * fl * fl
    sumlx = lanes[1, 9]
    suml2 = lanes[2, 9]
    scale = sumlx / suml2 if suml2 != np.float32(0.0) else np.float32(0.0)
    best = scale * sumlx
    pick = 9
    for s in range(_TRIALS):
        if s == 9:
            continue
        sumlx = lanes[1, s]
        suml2 = lanes[2, s]
        if suml2 > np.float32(0.0) and sumlx * sumlx > best * suml2:
            scale = sumlx / suml2
            best = scale * sumlx
            pick = s
    iscale = lanes[0, pick]
    for i in range(n):
        codes[i] = max(-nmax, min(nmax - 1, nearest_int(iscale * xb[i]))) + nmax
    return scale


@kernel
def _qkx_trial_terms(x, weight, nmax, iscale, low, trial, terms_l, terms_l2, terms_xl):
    """One trial of make_qkx_quants: its codes into ``trial`` (as float32, exact) and the terms
    GGML sums, w * l, w * l * l and w * l * x: no sum here, so the loop vectorises."""
    for i in range(U64(x.shape[0])):
        bits = np.float32(iscale * (x[i] - low) + ROUND_MAGIC).view(np.int32)
        l = np.float32(max(np.int32(0), min(np.int32(nmax), np.int32(np.int32(bits & np.int32(0x007FFFFF)) - np.int32(0x00400000)))))
        trial[i] = l
        wl = weight[i] * l
        terms_l[i] = wl
        terms_l2[i] = wl * l
        terms_xl[i] = wl * x[i]


@kernel
def _qkx_error_terms(x, weight, this_scale, this_min, trial, use_mad, terms_error):
    """The terms of a trial's weighted error, w * (scale * l + min - x)**2 (or |...|)."""
    for i in range(U64(x.shape[0])):
        diff = this_scale * trial[i] + this_min - x[i]
        diff = abs(diff) if use_mad else diff * diff
        terms_error[i] = weight[i] * diff


@kernel
def _qkx_sums(terms_l, terms_l2, terms_xl, terms_error, with_error):
    """GGML's sequential sums of a trial's terms (and of the previous trial's error terms, if
    ``with_error``): independent chains in one loop, which the CPU runs side by side."""
    sum_l = np.float32(0.0)
    sum_l2 = np.float32(0.0)
    sum_xl = np.float32(0.0)
    error = np.float32(0.0)
    for i in range(U64(terms_l.shape[0])):
        sum_l += terms_l[i]
        sum_l2 += terms_l2[i]
        sum_xl += terms_xl[i]
        if with_error:
            error += terms_error[i]
    return sum_l, sum_l2, sum_xl, error


@kernel
def _qkx_fit(sum_w, sum_x, sum_l, sum_l2, sum_xl):
    """make_qkx_quants' weighted least-squares scale and minimum of one trial (the minimum kept
    <= 0, the scale refitted then); None when the fit is singular (det <= 0: GGML skips the trial)."""
    det = sum_w * sum_l2 - sum_l * sum_l
    if not det > np.float32(0.0):
        return None
    this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
    this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
    if this_min > np.float32(0.0):
        this_min = np.float32(0.0)
        this_scale = sum_xl / sum_l2
    return this_scale, this_min


@kernel
def _qkx_first_try(x, weight, nmax, codes, use_mad):
    """make_qkx_quants up to its trials: the weighted sums, the range (its minimum kept <= 0) and
    the codes and error of scale (max - min) / nmax.  Returns (settled, sum_w, sum_x, max, min,
    scale, error); ``settled``: the group is constant (codes 0, scale 0), no trial to run."""
    n = x.shape[0]
    low = x[0]
    high = x[0]
    sum_w = weight[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < low:
            low = x[i]
        if x[i] > high:
            high = x[i]
        w = weight[i]
        sum_w += w
        sum_x += w * x[i]
    if low > np.float32(0.0):
        low = np.float32(0.0)
    if high <= low:  # make_qkx2_quants tests max == min: the same once min <= max
        codes[:n] = 0
        return True, sum_w, sum_x, high, low, np.float32(0.0), np.float32(0.0)
    iscale = np.float32(nmax) / (high - low)
    scale = np.float32(1.0) / iscale
    best_error = np.float32(0.0)
    for i in range(n):
        l = max(0, min(nmax, nearest_int(iscale * (x[i] - low))))
        codes[i] = l
        diff = scale * np.float32(l) + low - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weight[i] * diff
    return False, sum_w, sum_x, high, low, scale, best_error


@kernel
def make_qkx_quants(x, weight, nmax, codes, scratch, rmin, rdelta, nstep, use_mad):
    """GGML's make_qkx2_quants, and make_qkx3_quants given weights (the same search): codes in
    [0, nmax] and (scale, the_min), value ~ scale * code - the_min.  ``nstep + 1`` scales
    ``(rmin + rdelta * step + nmax) / (max - min)`` are tried, each with a weighted least-squares
    fit of scale and minimum (the minimum kept <= 0); the smallest weighted error (squared, or
    absolute with ``use_mad``) wins, ties to the earlier.  ``scratch``: float32 (6, >= len(x)).

    For groups of 32 (Q4_K, Q5_K, weighted Q4_1 / Q5_1; Q2_K's 16 take ``make_qkx_quants_lanes``):
    each trial's codes and the terms of its sums are computed in vector loops, and only the sums
    themselves run sequentially, in GGML's order; the next trial is
    prepared while this one's error is summed, so both chains of additions run side by side.
    The next trial uses the minimum as it stands, which GGML moves when a trial wins: then it is
    prepared again.  Every sum GGML compares is thus the one GGML computes (1.5x the sequential
    search's speed here)."""
    n = x.shape[0]
    settled, sum_w, sum_x, high, low, scale, best_error = _qkx_first_try(x, weight, nmax, codes, use_mad)
    if settled:
        return scale, -low
    fmax = np.float32(nmax)
    trial = scratch[0, :n]
    next_trial = scratch[1, :n]
    t_l = scratch[2, :n]
    t_l2 = scratch[3, :n]
    t_xl = scratch[4, :n]
    t_error = scratch[5, :n]
    iscale = (rmin + rdelta * np.float32(0) + fmax) / (high - low)
    _qkx_trial_terms(x, weight, nmax, iscale, low, trial, t_l, t_l2, t_xl)
    sum_l, sum_l2, sum_xl, _ = _qkx_sums(t_l, t_l2, t_xl, t_error, False)
    for step in range(nstep + 1):
        last = step == nstep
        # (the last step prepares no trial: its "next" repeats this one, unused)
        next_iscale = iscale if last else (rmin + rdelta * np.float32(step + 1) + fmax) / (high - low)
        fit = _qkx_fit(sum_w, sum_x, sum_l, sum_l2, sum_xl)
        if fit is not None:
            this_scale, this_min = fit
            _qkx_error_terms(x, weight, this_scale, this_min, trial, use_mad, t_error)
            _qkx_trial_terms(x, weight, nmax, next_iscale, low, next_trial, t_l, t_l2, t_xl)
            next_l, next_l2, next_xl, error = _qkx_sums(t_l, t_l2, t_xl, t_error, True)
            if error < best_error:
                for i in range(n):
                    codes[i] = np.int64(trial[i])
                best_error = error
                scale = this_scale
                low = this_min
                if not last:  # the next trial depends on the minimum just moved
                    next_iscale = (rmin + rdelta * np.float32(step + 1) + fmax) / (high - low)
                    _qkx_trial_terms(x, weight, nmax, next_iscale, low, next_trial, t_l, t_l2, t_xl)
                    next_l, next_l2, next_xl, _ = _qkx_sums(t_l, t_l2, t_xl, t_error, False)
        elif not last:
            _qkx_trial_terms(x, weight, nmax, next_iscale, low, next_trial, t_l, t_l2, t_xl)
            next_l, next_l2, next_xl, _ = _qkx_sums(t_l, t_l2, t_xl, t_error, False)
        else:
            break
        sum_l, sum_l2, sum_xl = next_l, next_l2, next_xl
        iscale = next_iscale
        trial, next_trial = next_trial, trial
    return scale, -low


# make_qkx_quants_lanes: 16 groups of 16 values (a Q2_K block), group g in vector lane g.  All its
# arrays live at constant offsets of one float32 scratch: with one base pointer LLVM can prove
# that they do not overlap, and vectorises the loops over the lanes (it did not with separate arrays)
_G = 16  # lanes: groups
_N = 16  # values per group
_X = 0  # the values, value i of group g at _X + i * _G + g
_W = _X + _G * _N  # their weights
_T = _W + _G * _N  # this trial's codes
_C = _T + _G * _N  # the best codes so far
_V = _C + _G * _N  # from here, per-lane values, _G floats each:
_LOW, _HIGH, _SUM_W, _SUM_X, _ISCALE, _SL, _SL2, _SXL, _SCALE_T, _MIN_T, _ERR, _BEST, _SCALE, _ACTIVE, _FIT = range(15)
LANES_SCRATCH = _V + 15 * _G  #: float32 values of make_qkx_quants_lanes' scratch


@kernel(inline="always")
def _v(k):
    """The offset of per-lane vector ``k`` in the scratch."""
    return U64(_V + k * _G)


@kernel
def make_qkx_quants_lanes(xb, weight, nmax, codes, s, rmin, rdelta, nstep, use_mad, scales, mins):
    """``make_qkx_quants`` of the 16 groups of 16 values of ``xb`` (256) at once, ``weight`` and
    ``codes`` (256) alike: scales[g], mins[g] = (scale, the_min) of group g.  ``s``: float32
    scratch of LANES_SCRATCH values.

    For Q2_K, whose groups are too short for ``make_qkx_quants``' vector loops: here a vector
    lane follows one group through GGML's search, so the vectors run across the groups.  Each
    lane adds its terms one after the other in GGML's order, and GGML's branches become selects
    (a lane whose fit is singular, or whose group is constant, takes no trial), so every group's
    bytes are GGML's.  Divisions by zero in lanes that take no trial are computed (inf or NaN, as
    every kernel's division, see ``jit.py``) and dropped."""
    fnmax = np.float32(nmax)
    zero = np.float32(0.0)
    # lane g holds group g
    for g in range(_G):
        for i in range(_N):
            s[U64(_X + i * _G + g)] = xb[g * _N + i]
            s[U64(_W + i * _G + g)] = weight[g * _N + i]
    low, high, sw, sx = _v(_LOW), _v(_HIGH), _v(_SUM_W), _v(_SUM_X)
    for g in range(U64(_G)):
        x0 = s[U64(_X) + g]
        s[low + g] = x0
        s[high + g] = x0
        w0 = s[U64(_W) + g]
        s[sw + g] = w0
        s[sx + g] = w0 * x0
    for i in range(1, _N):
        for g in range(U64(_G)):
            x = s[U64(_X + i * _G) + g]
            w = s[U64(_W + i * _G) + g]
            s[low + g] = x if x < s[low + g] else s[low + g]
            s[high + g] = x if x > s[high + g] else s[high + g]
            s[sw + g] += w
            s[sx + g] += w * x
    isc, scale, best, active = _v(_ISCALE), _v(_SCALE), _v(_BEST), _v(_ACTIVE)
    for g in range(U64(_G)):
        lo = s[low + g]
        lo = zero if lo > zero else lo
        s[low + g] = lo
        s[active + g] = np.float32(1.0) if s[high + g] > lo else zero
        iscale = fnmax / (s[high + g] - lo)
        s[isc + g] = iscale
        s[scale + g] = np.float32(1.0) / iscale
        s[best + g] = zero
    for i in range(_N):
        for g in range(U64(_G)):
            bits = np.float32(s[isc + g] * (s[U64(_X + i * _G) + g] - s[low + g]) + ROUND_MAGIC).view(np.int32)
            l = np.float32(max(np.int32(0), min(np.int32(nmax), np.int32(np.int32(bits & np.int32(0x007FFFFF)) - np.int32(0x00400000)))))
            s[U64(_C + i * _G) + g] = l
            diff = s[scale + g] * l + s[low + g] - s[U64(_X + i * _G) + g]
            diff = abs(diff) if use_mad else diff * diff
            s[best + g] += s[U64(_W + i * _G) + g] * diff
    sl, sl2, sxl, st, mt, err, fit = _v(_SL), _v(_SL2), _v(_SXL), _v(_SCALE_T), _v(_MIN_T), _v(_ERR), _v(_FIT)
    for step in range(nstep + 1):
        numerator = rmin + rdelta * np.float32(step) + fnmax
        for g in range(U64(_G)):
            s[isc + g] = numerator / (s[high + g] - s[low + g])
            s[sl + g] = zero
            s[sl2 + g] = zero
            s[sxl + g] = zero
        for i in range(_N):
            for g in range(U64(_G)):
                x = s[U64(_X + i * _G) + g]
                bits = np.float32(s[isc + g] * (x - s[low + g]) + ROUND_MAGIC).view(np.int32)
                l = np.float32(max(np.int32(0), min(np.int32(nmax), np.int32(np.int32(bits & np.int32(0x007FFFFF)) - np.int32(0x00400000)))))
                s[U64(_T + i * _G) + g] = l
                wl = s[U64(_W + i * _G) + g] * l
                s[sl + g] += wl
                s[sl2 + g] += wl * l
                s[sxl + g] += wl * x
        for g in range(U64(_G)):
            sum_w = s[sw + g]
            sum_x = s[sx + g]
            sum_l = s[sl + g]
            sum_l2 = s[sl2 + g]
            sum_xl = s[sxl + g]
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clipped = this_min > zero
            this_scale = sum_xl / sum_l2 if clipped else this_scale
            this_min = zero if clipped else this_min
            s[st + g] = this_scale
            s[mt + g] = this_min
            s[fit + g] = np.float32(1.0) if det > zero else zero
            s[err + g] = zero
        for i in range(_N):
            for g in range(U64(_G)):
                diff = s[st + g] * s[U64(_T + i * _G) + g] + s[mt + g] - s[U64(_X + i * _G) + g]
                diff = abs(diff) if use_mad else diff * diff
                s[err + g] += s[U64(_W + i * _G) + g] * diff
        for g in range(U64(_G)):
            win = (s[active + g] * s[fit + g] != zero) and s[err + g] < s[best + g]
            s[fit + g] = np.float32(1.0) if win else zero  # now: this trial wins
            s[best + g] = s[err + g] if win else s[best + g]
            s[scale + g] = s[st + g] if win else s[scale + g]
            s[low + g] = s[mt + g] if win else s[low + g]
        for i in range(_N):
            for g in range(U64(_G)):
                s[U64(_C + i * _G) + g] = s[U64(_T + i * _G) + g] if s[fit + g] != zero else s[U64(_C + i * _G) + g]
    for g in range(_G):
        on = s[active + g] != zero
        scales[g] = s[scale + g] if on else zero
        mins[g] = -s[low + g]
        for i in range(_N):
            codes[g * _N + i] = np.int64(s[U64(_C + i * _G + g)]) if on else 0
