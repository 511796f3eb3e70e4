"""Write a quantized model back to one .safetensors file (``qstrat dequantize``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qstrat.io.safetensors import map_tensor, write_safetensors
from qstrat.model import QuantizedModel


def dequantize_to_safetensors(output_dir: str | os.PathLike, target: str | os.PathLike, original: bool = True) -> int:
    """Dequantized tensors as F32, passed-through ones in their own dtype, one tensor at a time.

    ``original`` (default) restores the source layout; otherwise joint permutations stay
    folded in (the function-equivalent layout).  Returns how many tensors were written.
    """
    model = QuantizedModel(output_dir)
    items = []
    for name in model:
        if not model.entries[name].quantized:
            info = model.passthrough_info(name)

            def raw(info=info, name=name):
                array = map_tensor(info)
                return model.undo_joint(name, np.asarray(array)) if original else array

            items.append((name, info.dtype, info.shape, raw))
        else:
            shape = model.quantized_shape(name)
            items.append((name, "F32", shape, lambda name=name: model.tensor(name, original)))
    write_safetensors(Path(target), items, {"format": "pt", "qstrat": "dequantized"})
    return len(items)

