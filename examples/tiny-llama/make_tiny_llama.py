"""Regenerate examples/tiny-llama: a small Llama-shaped bf16 model (deterministic).

    python examples/tiny-llama/make_tiny_llama.py

Hidden size 512 (two Q8K blocks per row), 8 query heads sharing 2 key/value heads
(grouped-query attention), SwiGLU MLP of 768, 2 layers, heavy-tailed weights with a few
outlier input columns; about 8 MB.
"""

from pathlib import Path

from qstrat.synthetic import write_tiny_llama

if __name__ == "__main__":
    target = Path(__file__).resolve().parent
    write_tiny_llama(target)
    print(f"wrote {target / 'model.safetensors'}")
