"""Write a quantized model back to one .safetensors file (``qstrat dequantize``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qstrat.errors import OutputError
from qstrat.io.atomic import describe_os_error, remove_stale_temporaries
from qstrat.io.safetensors import exact_in, write_safetensors
from qstrat.model import open_model


#: quantized "to" a 16-bit float type: its values are exactly that type's, written in it (half the bytes)
_EXACT_16_BIT = {"f16": "F16", "bf16": "BF16"}


def dequantize_to_safetensors(model_path: str | os.PathLike, target: str | os.PathLike, original: bool = True) -> int:
    """Dequantized tensors as F32 (those stored as F16 or BF16 in that dtype, exactly), passed-through
    ones in their own dtype, one tensor at a time.

    ``model_path`` is an output directory or a qstrat ``.gguf`` file (read in place).  ``original``
    (default) restores the source layout; otherwise joint permutations stay folded in (the
    function-equivalent layout).  Returns how many tensors were written.
    """
    target = Path(target)
    # a dequantize killed with SIGKILL left its temporary (a whole model's worth) beside the target
    remove_stale_temporaries(target.parent, keep_live_writers=True, of=target.name)
    with open_model(model_path, original) as opened:
        model = opened.reader
        items = []
        for name in model:
            if not model.is_quantized(name):
                def raw(name=name):
                    array = model.stored_passthrough(name)[1]
                    return model.undo_joint(name, np.asarray(array)) if original else array

                items.append((name, model.passthrough_dtype(name), tuple(model.shape(name)), raw))
            else:
                tag = _EXACT_16_BIT.get(model.stored_type(name), "F32")
                items.append((name, tag, tuple(model.shape(name)), lambda name=name, tag=tag: exact_in(tag, opened[name])))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)  # as convert makes its file's directory
        except OSError as err:
            raise OutputError(describe_os_error(target.parent, err)) from None
        write_safetensors(target, items, {"format": "pt", "qstrat": "dequantized"})
    return len(items)
