"""The ``qstrat`` command line: parse, call the library, print, map errors to exit codes."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import typer

from qstrat._version import __version__
from qstrat.blocks import Q8K_VARIANTS
from qstrat.config import QuantizationConfig
from qstrat.errors import Interrupted, QstratError
from qstrat.results import QuantizationResult, TensorRecord
from qstrat.strategies import STRATEGIES

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 2 bad input, configuration or usage; 3 output not writable; "
    "4 a tensor failed a validation threshold; 130 interrupted."
)

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help=f"Quantize .safetensors models to Q8K (Candle / GGML), with column-permutation strategies.\n\n{EXIT_CODES_HELP}",
)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn library errors and Ctrl-C into a one-line message and the documented exit code."""
    try:
        yield
    except QstratError as err:
        print(f"error: {err}", file=sys.stderr)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise typer.Exit(Interrupted.exit_code) from None


def print_record(record: TensorRecord) -> None:
    shape = "x".join(str(d) for d in record.shape)
    if record.storage == "q8k":
        quality = ""
        if record.metrics is not None:
            quality = f" mse={record.metrics.mse:.3e} sqnr={record.metrics.sqnr_db:.1f}dB"
        print(f"  q8k   {record.name} [{shape}] {record.strategy} perm={record.permutation}{quality}", flush=True)
    else:
        print(f"  pass  {record.name} [{shape}] {record.dtype}: {record.reason}", flush=True)


def print_summary(result: QuantizationResult) -> None:
    mse = "n/a" if math.isnan(result.average_mse) else f"{result.average_mse:.3e}"
    print(
        f"Done in {result.elapsed_s:.2f}s. Quantized: {result.tensor_count}, skipped: {result.skipped_count}, "
        f"average MSE: {mse}. Output: {result.output_dir}"
    )


@app.command()
def quantize(
    input_path: Path = typer.Argument(..., metavar="INPUT", help=".safetensors file or model directory"),
    output_dir: Path = typer.Argument(..., metavar="OUTPUT_DIR", help="directory for the quantized model"),
    strategy: list[str] = typer.Option(
        ["identity"], "--strategy", "-s", help=f"strategy chain, in order (repeat the flag): {', '.join(STRATEGIES)}"
    ),
    variant: str = typer.Option("candle", help=f"Q8K rounding variant: {', '.join(Q8K_VARIANTS)}"),
    workers: int = typer.Option(1, help="worker processes"),
    validation: bool = typer.Option(True, help="measure each tensor's weight error"),
) -> None:
    """Quantize INPUT into OUTPUT_DIR with the given strategy chain."""
    from qstrat.pipelines.run import quantize_model

    with user_errors():
        config = QuantizationConfig(
            strategies=strategy, variant=variant, workers=workers, validation=validation, output_dir=output_dir
        )
        print_summary(quantize_model(input_path, config, progress=lambda rs, _: [print_record(r) for r in rs]))


@app.command()
def version() -> None:
    """Print the qstrat version."""
    print(__version__)


def main() -> None:
    app()
