"""``quantize_q8k INPUT OUTPUT_DIR``: the original tool's command line, environment and output."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from qstrat.cli import EXIT_CODES_HELP, announce_first_compile, print_record, print_summary, run_command, user_errors
from qstrat.config import QuantizationConfig
from qstrat.legacy import environment_help, unknown_variables

HELP = f"""Quantize a .safetensors file or model directory to Q8K files (original tool compatible).

\b
Environment:
{environment_help()}

"""


def quantize_q8k(
    input_path: Path = typer.Argument(..., metavar="INPUT", help=".safetensors file or model directory"),
    output_dir: Path = typer.Argument(..., metavar="OUTPUT_DIR", help="directory for .q8k/.perm files"),
) -> None:
    from qstrat.pipelines.run import quantize_model

    with user_errors():
        # like the original tool, replace whatever an earlier run left (an identical rerun still resumes)
        config = QuantizationConfig(output_dir=output_dir, force=True).with_environment()
        for name in unknown_variables(os.environ):  # a misspelt one would change nothing, silently
            print(f"warning: {name} is not a variable quantize_q8k reads (see quantize_q8k --help)", file=sys.stderr, flush=True)
        print(f"Input   : {input_path}")
        print(f"Output  : {output_dir}")
        print(f"Permute : {'off' if config.chain_entries() == ['identity'] else 'on'}")
        print(f"Strategy: {', '.join(e if isinstance(e, str) else str(e) for e in config.chain_entries())}")
        print(f"Variant : {config.variant}", flush=True)
        announce_first_compile()
        print_summary(quantize_model(input_path, config, progress=lambda records, _: [print_record(r) for r in records]))


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(help=HELP + EXIT_CODES_HELP)(quantize_q8k)
    run_command(app)
