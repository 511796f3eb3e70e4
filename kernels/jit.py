"""How every kernel is compiled: numba's ``njit`` with C's float arithmetic, cached.

``error_model="numpy"``: a float division by zero gives inf or NaN, as in ggml's C, instead of
raising ZeroDivisionError.  ggml quantizes blocks whose search divides by zero (an importance
weight only on a block's zeros, a range that overflows float32) and so must qstrat, to the same
bytes.  A raise inside a kernel reaches Python as a SystemError at best; inside a ``prange`` loop
it is lost, with the blocks that thread had not yet written left as they were.
"""

from __future__ import annotations

import functools

from numba import njit

#: ``@kernel`` or ``@kernel(parallel=True, ...)``: njit(cache=True, error_model="numpy", ...)
kernel = functools.partial(njit, cache=True, error_model="numpy")
