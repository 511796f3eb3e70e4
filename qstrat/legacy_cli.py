"""``quantize_q8k INPUT OUTPUT_DIR``: the original tool's command line, environment and output."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import typer

from qstrat.config import QuantizationConfig
from qstrat.errors import QstratError
from qstrat.results import TensorRecord

HELP = """Quantize a .safetensors file or model directory to Q8K files (original tool compatible).

\b
Environment:
  CANDLE_Q8K_PERMUTE=1          permute columns (default off)
  CANDLE_Q8K_STRATEGY=l2_norm   identity | l2_norm | amax | attention_aware
  CANDLE_Q8K_THREADS=N          worker processes (default 1)
  CANDLE_Q8K_VALIDATION=0|1     measure the weight error (default 1)
  CANDLE_Q8K_VARIANT=candle     candle | candle-0.9 | ggml

\b
Exit codes: 0 success, 2 bad input or configuration, 3 output not writable,
130 interrupted.
"""


def _print_tensor(record: TensorRecord) -> None:
    rows = "x".join(str(d) for d in record.shape)
    if record.storage == "q8k":
        quality = ""
        if record.metrics is not None:
            quality = f" mse={record.metrics.mse:.3e} sqnr={record.metrics.sqnr_db:.1f}dB"
        print(f"  q8k   {record.name} [{rows}] {record.strategy} perm={record.permutation}{quality}", flush=True)
    else:
        print(f"  pass  {record.name} [{rows}] {record.dtype}: {record.reason}", flush=True)


def quantize_q8k(
    input_path: Path = typer.Argument(..., metavar="INPUT", help=".safetensors file or model directory"),
    output_dir: Path = typer.Argument(..., metavar="OUTPUT_DIR", help="directory for .q8k/.perm files"),
) -> None:
    from qstrat.pipelines.run import quantize_model

    try:
        config = QuantizationConfig(output_dir=output_dir).with_environment()
        print(f"Input   : {input_path}")
        print(f"Output  : {output_dir}")
        print(f"Permute : {'on' if config.use_permutation else 'off'}")
        print(f"Strategy: {', '.join(e if isinstance(e, str) else str(e) for e in config.chain_entries())}")
        print(f"Variant : {config.variant}", flush=True)
        result = quantize_model(input_path, config, progress=lambda records: [_print_tensor(r) for r in records])
    except QstratError as err:
        print(f"error: {err}", file=sys.stderr)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
    mse = "n/a" if math.isnan(result.average_mse) else f"{result.average_mse:.3e}"
    print(
        f"Done in {result.elapsed_s:.2f}s. Quantized: {result.tensor_count}, skipped: {result.skipped_count}, "
        f"average MSE: {mse}"
    )


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(help=HELP)(quantize_q8k)
    app()
