"""The ``qstrat`` command line: parse, call the library, print, map errors to exit codes."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import typer

from qstrat._version import __version__
from qstrat.blocks import DEFAULT_VARIANT, Q8K_VARIANTS
from qstrat.config import QuantizationConfig
from qstrat.errors import (
    EXIT_BATCH_PARTIAL,
    EXIT_INTERNAL,
    EXIT_OK,
    ConfigError,
    InputError,
    Interrupted,
    OutputError,
    QstratError,
    ValidationFailed,
    exit_codes_help,
)
from qstrat.entry import run_json_line
from qstrat.interrupts import handle_stop_signals, ignore_stop_signals
from qstrat.io.gguf_read import is_gguf_name
from qstrat.legacy import environment_help, unknown_variables
from qstrat.report import (
    describe_container,
    describe_formats,
    describe_importance,
    describe_residual_choice,
    larger_than_input,
    summarize,
)
from qstrat.results import QuantizationResult, TensorRecord
from qstrat.strategies import STRATEGIES

EXIT_CODES_HELP = exit_codes_help()

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help=f"Quantize .safetensors and GGUF models to GGML block types (Q8K by default; Q8_0, Q4_K, llama.cpp presets ...) for Candle and llama.cpp, with column-permutation strategies.\n\n{EXIT_CODES_HELP}",
)


def _print_error(message: str, exit_code: int) -> None:
    print(f"error: {message}", file=sys.stderr)


@contextlib.contextmanager
def user_errors(report: Callable[[str, int], None] = _print_error) -> Iterator[None]:
    """Turn library errors, Ctrl-C and SIGTERM into a one-line message and the documented exit code;
    ``report`` says it (by default on stderr as ``error: ...``)."""
    try:
        yield
    except QstratError as err:
        report(str(err), err.exit_code)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        report("interrupted", Interrupted.exit_code)
        raise typer.Exit(Interrupted.exit_code) from None
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as err:  # a bug, or a library failing in a way we did not foresee
        report(f"unexpected {type(err).__name__}: {err} (please report this)", EXIT_INTERNAL)
        raise typer.Exit(EXIT_INTERNAL) from None


def fallback_note(fallback_from: str | None, shape) -> str:
    """How a tensor line says that the type asked for could not take the rows."""
    if not fallback_from:
        return ""
    return f" (fallback: {fallback_from} cannot take rows of {shape[-1]}, as llama.cpp)"


def _db(value: float) -> str:
    """A tensor line's SQNR: ``31.2dB``, or ``exact`` (no error at all)."""
    return "exact" if value == math.inf else f"{value:.1f}dB"


def format_record(record: TensorRecord) -> str:
    shape = "x".join(str(d) for d in record.shape)
    if record.quantized:
        quality = ""
        m = record.metrics
        if m is not None and m.mse is not None:
            quality = f" mse={m.mse:.3e} sqnr={_db(m.sqnr_db)}"
        if m is not None and m.weighted_sqnr_db is not None:
            quality += f" weighted_sqnr={_db(m.weighted_sqnr_db)}"
        if m is not None and m.gradient_test_mse is not None:
            quality += f" gradient_test={m.gradient_test_mse:.3e}"
        fallback = fallback_note(record.fallback_from, record.shape)
        importance = " (no importance vector in the imatrix)" if record.imatrix is False else ""
        copied = f" (copied: already {record.storage} in the input)" if record.copied else ""
        return f"  {record.storage:<5} {record.name} [{shape}] {record.strategy} perm={record.permutation}{quality}{fallback}{importance}{copied}"
    return f"  pass  {record.name} [{shape}] {record.dtype}: {record.reason}"


def print_record(record: TensorRecord) -> None:
    print(format_record(record), flush=True)


def summary_line(result: QuantizationResult) -> str:
    mse = "n/a" if math.isnan(result.average_mse) else f"{result.average_mse:.3e}"
    summary = summarize(result)
    detail = ""
    if set(summary["formats"]) - {"q8k"}:  # a Q8K run's line stays the original tool's
        fallbacks = f"; {len(summary['fallbacks'])} by llama.cpp's fallback" if summary["fallbacks"] else ""
        copied = f"; {summary['copied_count']} copied from the input as they were" if summary["copied_count"] else ""
        detail = f" ({describe_formats(summary['formats'])}{fallbacks}{copied})"
    return (
        f"Done in {result.elapsed_s:.2f}s. Quantized: {result.tensor_count}{detail}, skipped: {result.skipped_count}, "
        f"average MSE: {mse}. Output: {result.output_dir}"
    )


def print_summary(result: QuantizationResult, imatrix: object = None) -> None:
    """The summary line, then which importance matrix the run used (``imatrix``: its path)."""
    print(summary_line(result), flush=True)
    line = describe_importance(summarize(result), imatrix)
    if line is not None:
        print(line[0].upper() + line[1:] + ".", flush=True)
    if result.residual is not None:
        print(describe_residual_choice(result.residual), flush=True)


def announce_first_compile(formats: Iterable[str] = ("q8_k",), weighted: bool = False) -> None:
    """Say once, when the kernels of a run's block types (or llama.cpp presets: their main type)
    are not cached yet, why it starts slowly (on stderr: stdout may be parsed); ``weighted``: the
    run has an importance matrix, whose kernels are compiled apart."""
    from qstrat.formats import FORMATS
    from qstrat.kernels._jit_cache import kernel_cache_dir, kernels_compiled
    from qstrat.presets import default_type, is_preset

    types = sorted({default_type(f) if is_preset(f) else f.strip().lower() for f in formats} & FORMATS.keys())
    modules = {FORMATS[t].kernels for t in types if FORMATS[t].kernels}
    weighted_modules = {FORMATS[t].kernels for t in types if FORMATS[t].kernels and FORMATS[t].uses_imatrix} if weighted else set()
    if modules and not kernels_compiled(modules, weighted_modules):
        with_vectors = " with importance vectors" if kernels_compiled(modules) else ""
        print(
            f"qstrat: compiling the kernels of {', '.join(types)}{with_vectors} for this machine (once: about 5 s for q8_k, "
            f"10-30 s for the other block types); later runs load them from {kernel_cache_dir()}",
            file=sys.stderr,
            flush=True,
        )


class Reporter:
    """Progress for one model: a bar on a terminal, plain lines otherwise (cron), or nothing."""

    def __init__(self, mode: str) -> None:
        self.mode = mode  # "bar" | "lines" | "quiet"
        self._progress = None

    @contextlib.contextmanager
    def model(self, name: str, total_bytes: int) -> Iterator[None]:
        if self.mode != "bar":
            if self.mode == "lines":
                print(f"{name}: quantizing", flush=True)
            yield
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        with Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[tensors]} tensors"),
            TimeRemainingColumn(), transient=False,
        ) as progress:
            self._progress, self._name = progress, name
            self._task = progress.add_task(name, total=total_bytes, tensors=0)
            try:
                yield
            finally:
                self._progress = None

    def stage(self, text: str) -> None:
        """Work before the first tensor is done (a search that takes minutes): said, so that a
        silent start does not look like a hang."""
        if self.mode == "lines":
            print(f"  {text}", flush=True)
        elif self._progress is not None:
            self._progress.update(self._task, description=f"{self._name}: {text}")

    def __call__(self, records: list[TensorRecord], nbytes: int) -> None:
        if self.mode == "lines":
            for record in records:
                print(format_record(record), flush=True)
        elif self._progress is not None:
            done = self._progress.tasks[0].fields["tensors"] + len(records)
            self._progress.update(self._task, advance=nbytes, tensors=done, description=self._name)


def _print_plan(name: str, output: Path, description: dict) -> None:
    print(f"{name} -> {output}")
    for q in description["quantized"]:
        shape = "x".join(map(str, q["shape"]))
        fallback = fallback_note(q.get("fallback_from"), q["shape"])
        copied = f" (copied: already {q['format']} in the input)" if q.get("copied") else ""
        print(f"  {q['format']:<5} {q['name']} [{shape}] {q['dtype']} {q['strategy']} ({q['permutation']}){fallback}{copied}")
    for p in description["passthrough"]:
        shape = "x".join(map(str, p["shape"]))
        print(f"  pass  {p['name']} [{shape}] {p['dtype']}: {p['reason']}")
    mb = description["estimated_output_bytes"] / 1e6
    print(f"  {len(description['quantized'])} to quantize, {len(description['passthrough'])} passed through, about {mb:.1f} MB of output")


@app.command(epilog="\b\nEnvironment (over the YAML file, under the flags):\n" + environment_help())
def run(
    config: Path = typer.Argument(..., help="YAML run configuration (see configs/)"),
    input: list[str] = typer.Option(None, "--input", "-i", help="input model(s), replacing the config's (repeatable; globs allowed)"),
    output: str = typer.Option(None, "--output", "-o", help="output directory, or template with {model}"),
    set_: list[str] = typer.Option(None, "--set", help="override a config value: key.path=value (repeatable)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and write nothing"),
    force: bool = typer.Option(False, "--force", help="replace results of a different config or input"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print nothing but errors"),
    json_output: bool = typer.Option(False, "--json", help="print one machine-readable summary line"),
) -> None:
    """Run the quantization a YAML config describes, over one model or a batch of models.

    Precedence: built-in defaults < the YAML file < CANDLE_Q8K_* environment < flags.
    A rerun resumes: tensors whose files are intact are kept.
    """
    from qstrat.io.gguf_input import open_input
    from qstrat.pipelines.plan import make_plan
    from qstrat.pipelines.run import check_output_dir, describe_plan, quantize_model
    from qstrat.runconfig import load_run_config

    outcomes: list[dict] = []

    def report_json(message: str, exit_code: int) -> None:
        # --json: one line on stdout whatever happens, a stopped run's included (a log of JSON lines stays one)
        print(run_json_line(outcomes, exit_code, message), flush=True)

    with user_errors(report_json if json_output else _print_error):
        spec = load_run_config(config, input_override=input or None, output_override=output, sets=set_ or ())
        if not (quiet or json_output):
            for name in unknown_variables(os.environ):  # a misspelt one would change nothing, silently
                print(f"warning: {name} is not a variable qstrat reads (see qstrat run --help)", file=sys.stderr, flush=True)
        if dry_run:
            plans, failed = {}, 0
            for job in spec.models:
                try:
                    model = open_input(job.input)
                    check_output_dir(job.output, model)  # what the run checks first, before its plan
                    plan = make_plan(model, spec.config_for(job))
                    description = describe_plan(plan)
                    warnings = spec.config.unmatched_rules(model.tensors) + list(plan.notes)
                except QstratError as err:
                    if not spec.batch:
                        raise
                    # a batch's plan goes on past a model that would fail, as its run does
                    failed += 1
                    plans[job.name] = {"output": str(job.output), "error": str(err)}
                    if not json_output:
                        print(f"error: {job.name}: {err}", file=sys.stderr)
                    continue
                plans[job.name] = {"output": str(job.output), **description, **({"warnings": warnings} if warnings else {})}
                if not json_output:
                    _print_plan(job.name, job.output, description)
                    for warning in warnings:
                        print(f"warning: {job.name}: {warning}", file=sys.stderr)
            if json_output:
                print(json.dumps({"dry_run": True, "models": plans, **({"exit_code": EXIT_BATCH_PARTIAL} if failed else {})}))
            if failed:
                raise typer.Exit(EXIT_BATCH_PARTIAL)
            return
        mode = "quiet" if quiet or json_output else ("bar" if sys.stdout.isatty() else "lines")
        if mode != "quiet":
            announce_first_compile(spec.config.block_types, weighted=any(job.imatrix is not None for job in spec.models))
        reporter = Reporter(mode)
        exit_code = EXIT_OK
        unchecked = spec.config.unchecked_thresholds
        if mode != "quiet":
            for sentence in unchecked:
                print(f"warning: {sentence}", file=sys.stderr, flush=True)
        for job in spec.models:
            outcome = {"model": job.name, "input": str(job.input), "output": str(job.output)}
            try:
                model = open_input(job.input)

                def warn(note: str, name: str = job.name) -> None:  # before the run: most of a MoE model's bytes passed through, say
                    if mode != "quiet":
                        print(f"warning: {name}: {note}", file=sys.stderr, flush=True)

                with reporter.model(job.name, sum(t.nbytes for t in model)):
                    result = quantize_model(
                        job.input, spec.config_for(job), job.output, reporter, force=force, thresholds=spec.thresholds,
                        settings={"thresholds": spec.raw["validation"]["thresholds"]}, outputs=spec.outputs, warn=warn,
                    )
            except QstratError as err:
                outcome.update(status="failed", error=str(err))
                if not spec.batch:
                    outcomes.append(outcome)
                    raise
                exit_code = EXIT_BATCH_PARTIAL
                if not json_output:
                    print(f"error: {job.name}: {err}", file=sys.stderr)
            else:
                summary = summarize(result)
                outcome.update(
                    status="threshold_failed" if result.failures else "ok", up_to_date=result.up_to_date,
                    tensor_count=result.tensor_count,
                    copied_count=summary["copied_count"],
                    skipped_count=result.skipped_count,
                    average_mse=None if math.isnan(result.average_mse) else result.average_mse,
                    failures=[f.as_dict() for f in result.failures],
                    elapsed_s=round(result.elapsed_s, 3),
                )
                if result.failures and exit_code == EXIT_OK:
                    exit_code = ValidationFailed.exit_code
                if result.container is not None:
                    outcome["gguf"] = result.container
                larger = larger_than_input(result, sum(f.size for f in model.files))
                warnings = spec.config.unmatched_rules(model.tensors) + [w for w in (larger, summary.get("zeroed")) if w is not None]
                if "imatrix" in summary and not summary["imatrix"]["used"]:  # another model's, or names that differ
                    warnings.append(f"the importance matrix {job.imatrix} has a vector for none of the "
                                    f"{len(summary['imatrix']['missing'])} quantized tensors: they were quantized without one")
                if warnings or result.notes:
                    outcome["warnings"] = list(result.notes) + warnings  # the plan's notes: said when the run began
                    if mode != "quiet":
                        for warning in warnings:
                            print(f"warning: {job.name}: {warning}", file=sys.stderr, flush=True)
                if "imatrix" in summary:
                    outcome["imatrix"] = {"path": str(job.imatrix), **summary["imatrix"]}
                if mode == "quiet" and not json_output:
                    for failure in result.failures:  # what makes the exit code 4 (5 in a batch) is an error
                        print(f"error: {job.name}: below threshold: {failure}", file=sys.stderr, flush=True)
                if mode != "quiet":
                    if result.up_to_date:
                        print(f"{job.name}: up to date (this run finished here before and its files are intact): nothing redone")
                    print_summary(result, job.imatrix)
                    for failure in result.failures:
                        print(f"  below threshold: {failure}", flush=True)
                    if result.container is not None:
                        head, *notes = describe_container(result.container)
                        print(f"GGUF {head}", flush=True)
                        for note in notes:
                            print(f"warning: {note}", file=sys.stderr, flush=True)
            outcomes.append(outcome)
        if json_output:
            print(run_json_line(outcomes, exit_code, warnings=unchecked))
        elif spec.batch and mode != "quiet":
            failed = [o["model"] for o in outcomes if o["status"] != "ok"]
            print(f"Batch: {len(outcomes) - len(failed)} of {len(outcomes)} models ok" + (f"; not ok: {', '.join(failed)}" if failed else ""))
        if exit_code:
            raise typer.Exit(exit_code)


@app.command()
def quantize(
    input_path: Path = typer.Argument(..., metavar="INPUT", help=".safetensors file or model directory"),
    output_dir: Path = typer.Argument(..., metavar="OUTPUT_DIR", help="directory for the quantized model"),
    strategy: list[str] = typer.Option(
        ["identity"], "--strategy", "-s", help=f"strategy chain, in order (repeat the flag): {', '.join(STRATEGIES)}"
    ),
    variant: str = typer.Option(DEFAULT_VARIANT, help=f"Q8K rounding variant: {', '.join(Q8K_VARIANTS)}"),
    workers: int = typer.Option(1, help="worker processes"),
    validation: bool = typer.Option(True, help="measure each tensor's weight error"),
    force: bool = typer.Option(False, "--force", help="replace results of a different config or input"),
) -> None:
    """Quantize INPUT into OUTPUT_DIR with the given strategy chain (no config file)."""
    from qstrat.pipelines.run import quantize_model

    with user_errors():
        announce_first_compile()
        config = QuantizationConfig(
            strategies=strategy, variant=variant, workers=workers, validation=validation, output_dir=output_dir, force=force
        )
        result = quantize_model(input_path, config, progress=lambda rs, _: [print_record(r) for r in rs],
                                warn=lambda note: print(f"warning: {note}", file=sys.stderr, flush=True))
        print_summary(result)


NAMED_CHAINS = {
    "attention_aware": ["attention_aware", "l2_norm"],  # as the original tool
    "function_preserving": ["mlp_joint", "head_order", "identity"],
    "residual_stream": ["residual_stream", "mlp_joint", "head_order", "identity"],
}


def parse_chains(text: str) -> dict[str, list[str]]:
    """``a,b+c``: chains separated by commas, strategies of one chain joined by '+'."""
    chains = {}
    for item in (part.strip() for part in text.split(",")):
        if item:
            chains[item] = NAMED_CHAINS.get(item) or [s.strip() for s in item.split("+")]
            unknown = [s for s in chains[item] if s not in STRATEGIES]
            if unknown:
                raise ConfigError(f"--strategies: unknown strategy {unknown[0]!r}; strategies (joined with '+'): "
                                  f"{', '.join(STRATEGIES)}; named chains: {', '.join(NAMED_CHAINS)}")
    return chains


@app.command()
def compare(
    model: Path = typer.Argument(..., help=".safetensors file, model directory or GGUF model"),
    strategies: str = typer.Option(
        "identity,l2_norm,amax,attention_aware,function_preserving", "--strategies", "-s",
        help="chains to compare, comma-separated; join a chain's strategies with '+' (attention_aware "
        "means attention_aware+l2_norm, function_preserving means mlp_joint+head_order+identity, residual_stream "
        "means residual_stream+mlp_joint+head_order+identity)",
    ),
    formats: str = typer.Option("q8_k", "--formats", "-f", help="block types or llama.cpp file types to compare, comma-separated (q8_k, q8_0, q4_k, q4_k_m, ...)"),
    imatrix: Path = typer.Option(None, "--imatrix", help="an importance matrix: every case also with it"),
    text: Path = typer.Option(None, "--text", "-t", help="also evaluate each case on this text (perplexity, KL divergence from the source model; numpy forward, Llama family)"),
    ctx: int = typer.Option(512, "--ctx", "-c", help="with --text: tokens per chunk"),
    chunks: int = typer.Option(None, "--chunks", help="with --text: at most this many chunks"),
    variant: str = typer.Option(DEFAULT_VARIANT, help=f"Q8K rounding variant: {', '.join(Q8K_VARIANTS)}"),
    workers: int = typer.Option(1, help="worker processes"),
    output: Path = typer.Option(None, "--output", "-o", help="also write compare.json, compare.md and compare.png here"),
    json_output: bool = typer.Option(False, "--json", help="print the table as one JSON line"),
) -> None:
    """Quantize MODEL every way asked (format x strategy chain x importance matrix) and compare size and
    error; with --text also the perplexity and KL divergence from the source model, as qstrat eval
    computes them (by qstrat's numpy forward, the same engine for every type).  Without --text nothing
    is written; with it, each case goes through a temporary directory."""
    from qstrat.comparison import cases, compare_model, render_comparison
    from qstrat.io.atomic import atomic_writer
    from qstrat.io.gguf_input import open_input
    from qstrat.report import plot_sqnr, sqnr_series

    with user_errors():
        if not json_output:
            announce_first_compile((f for f in formats.split(",") if f.strip()), weighted=bool(imatrix))
        _check_counts(ctx=(ctx, 4), chunks=(chunks, 1), workers=(workers, 1))
        if output is not None and output.exists() and not output.is_dir():
            raise OutputError(f"{output}: exists and is not a directory (--output)")
        data = _read_text(text) if text is not None else None
        case_list = cases([f for f in formats.split(",") if f.strip()], parse_chains(strategies), imatrix)
        name = open_input(model).name

        def announce(index: int, total: int, case) -> None:
            if sys.stderr.isatty():
                print(f"compare: {case.label} ({index + 1}/{total})", file=sys.stderr, flush=True)

        rows, results = compare_model(model, case_list, variant=variant, workers=workers, text=data, ctx=ctx, chunks=chunks,
                                      text_name=str(text), announce=announce)
        evaluated = (f"Perplexity and KL divergence (source || quantized) on {text}, chunks of {ctx} tokens, by qstrat's numpy "
                     "forward." if text is not None else None)
        table = render_comparison(name, rows, evaluated)
        document = {"model": name, "text": None if text is None else str(text), "chains": rows}
        print(json.dumps(document) if json_output else table, end="" if not json_output else "\n")
        if output is not None:
            output.mkdir(parents=True, exist_ok=True)
            with atomic_writer(output / "compare.json") as out:
                out.write(json.dumps(document, indent=1).encode())
            with atomic_writer(output / "compare.md") as out:
                out.write(table.encode())
            plot_sqnr({label: sqnr_series(r) for label, r in results.items()}, output / "compare.png", f"{name}: SQNR per tensor and case")


def _stored_kinds(storages: set[str], variant: str | None) -> str:
    """What an inspected model is quantized to, for its table's title."""
    return ", ".join(f"Q8K variant {variant}" if s == "q8k" else s for s in sorted(storages)) or "nothing quantized"


def _gguf_table(path: Path, model):
    """``inspect``'s table of a GGUF file (qstrat's or another tool's; ``model``, its GGUFModel), read in place."""
    from rich.table import Table

    from qstrat.io.names import storage_name

    stored = model.stored_type_names()  # a type qstrat does not read (Q8_1, ...) is listed by its name
    if not model.unreadable_types():
        stored = {n: storage_name(t) for n, t in model.checked_types().items() if t is not None}
    kinds = _stored_kinds(set(stored.values()), model.variant)
    table = Table(title=f"{path} (GGUF: {kinds})")
    for column in ("tensor", "shape", "dtype", "storage", "permutation"):
        table.add_column(column)
    for name in model.model_tensors():
        dtype, storage = ("", stored[name]) if name in stored else (model.passthrough_dtype(name), "passthrough")
        table.add_row(name, "x".join(map(str, model.shape(name))), dtype, storage, model.permutation_kind(name))
    return table


@app.command()
def inspect(path: Path = typer.Argument(..., help=".safetensors file, model directory or output directory")) -> None:
    """Print a table of the tensors of a model or of a quantized output directory."""
    from rich.console import Console
    from rich.table import Table

    from qstrat.io.manifest import MANIFEST_NAME, PASSTHROUGH_NAME, read_manifest
    from qstrat.io.safetensors import SafetensorsModel
    from qstrat.model import refuse_unfinished

    # an output directory's own manifest has the metrics, also when its tensors are in a GGUF container
    with user_errors():
        console = Console(width=max(120, Console().width))
        manifest = read_manifest(path) if path.is_dir() and (path / MANIFEST_NAME).exists() else None
        opened = {}  # a GGUF file's header parsed once (a large vocabulary takes a while)
        if path.is_file() and is_gguf_name(path):
            from qstrat.io.gguf import GGUFModel

            opened[path] = GGUFModel(path)
            table = _gguf_table(path, opened[path])  # read in place
        elif manifest is not None:
            stored = {e.storage for e in manifest.tensors.values()} - {"passthrough"}
            kinds = _stored_kinds(stored, manifest.variant)
            table = Table(title=f"{path} (qstrat output: {kinds})")
            for column in ("tensor", "shape", "dtype", "storage", "strategy", "permutation", "SQNR dB", "MSE"):
                table.add_column(column)
            for name, e in sorted(manifest.tensors.items()):
                quantized = e.storage != "passthrough"
                sqnr = e.metrics.sqnr_db if quantized and e.metrics else None
                mse = e.metrics.mse if quantized and e.metrics else None
                table.add_row(
                    name, "x".join(map(str, e.shape)), e.dtype, e.storage, (e.strategy if quantized else None) or "",
                    e.permutation, "exact" if sqnr == "inf" else (f"{sqnr:.1f}" if sqnr is not None else ""),
                    f"{mse:.2e}" if mse is not None and mse != "inf" else "",
                )
        elif path.is_dir() and any(path.glob("*.q8k")):
            # the original Rust tool's output: .q8k (+ .perm) files, no manifest
            from qstrat.io.q8k import read_q8k_shape
            from qstrat.model import QuantizedModel

            model = QuantizedModel(path)
            count = sum(e.quantized for e in model.entries.values())
            table = Table(title=f"{path} (no manifest, as the original tool writes: {count} Q8K tensors)")
            for column in ("tensor", "shape", "storage", "permutation", "file"):
                table.add_column(column)
            for name in model:
                entry = model.entries[name]
                if entry.quantized:
                    shape, storage, file = read_q8k_shape(path / entry.files["q8k"]), "q8k", entry.files["q8k"]
                else:
                    shape, storage, file = model.passthrough_info(name).shape, "passthrough", PASSTHROUGH_NAME
                permutation = "runtime (.perm)" if "perm" in entry.files else "none"
                table.add_row(name, "x".join(map(str, shape)), storage, permutation, file)
        else:
            if path.is_dir():
                refuse_unfinished(path)
            model = SafetensorsModel(path)
            table = Table(title=f"{path} ({len(model)} tensors in {len(model.files)} file(s))")
            for column in ("tensor", "shape", "dtype", "bytes", "file"):
                table.add_column(column)
            for info in sorted(model, key=lambda i: i.name):
                table.add_row(info.name, "x".join(map(str, info.shape)), info.dtype, str(info.nbytes), info.path.name)
        console.print(table)
        # what a GGUF file is: a model llama.cpp runs, or qstrat's container
        containers = [path] if path.is_file() and is_gguf_name(path) else []
        if manifest is not None and path.is_dir():
            containers += [path / c for c in manifest.containers or {} if (path / c).is_file()]
        if containers:
            from qstrat.io.gguf import GGUFModel

            for container in containers:
                print(f"{container.name}: {(opened.get(container) or GGUFModel(container)).describe_layout()}")


@app.command()
def convert(
    source: Path = typer.Argument(..., help="an output directory (qstrat's or the original tool's), or a .gguf file"),
    target: Path = typer.Argument(..., help="the .gguf file to write, or the output directory to write"),
) -> None:
    """Convert an output directory to one GGUF file, or a qstrat GGUF file back to a directory (no re-quantization)."""
    from qstrat.convert import directory_to_gguf, gguf_to_directory

    with user_errors():
        if source.is_dir():
            print(f"wrote {directory_to_gguf(source, target)}")
        elif is_gguf_name(source) or source.is_file():
            print(f"wrote {gguf_to_directory(source, target)}")
        else:
            raise InputError(f"{source}: no such file or directory")


@app.command()
def verify(output_dir: Path = typer.Argument(..., help="output directory or .gguf file to check")) -> None:
    """Check every file of an output directory against its manifest, or a .gguf file against the
    checksum it records; exit 0 only if all is intact, 3 if a file is missing or damaged (each named)."""
    from qstrat.verify import verify_gguf_file, verify_output

    with user_errors():
        if not output_dir.exists():
            raise InputError(f"{output_dir}: no such file or directory")
        checked = True
        if output_dir.is_file() and is_gguf_name(output_dir):
            problems, checked = verify_gguf_file(output_dir)
        else:
            problems = verify_output(output_dir)
        if problems:
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            raise OutputError(f"{output_dir}: {len(problems)} problem(s) found")
        if checked:
            print(f"{output_dir}: intact")
        else:
            print(f"{output_dir}: intact as far as its structure goes (it records no checksum of its present data: "
                  "written or rewritten by another tool, or by an older qstrat)")


@app.command()
def dequantize(
    output_dir: Path = typer.Argument(..., help="quantized output directory"),
    target: Path = typer.Argument(..., metavar="OUT.safetensors", help="file to write"),
    function_layout: bool = typer.Option(
        False, "--function-layout", help="keep joint permutations folded in (default: the original layout)"
    ),
) -> None:
    """Write the whole model back to one .safetensors file (quantized tensors as F32)."""
    from qstrat.export import dequantize_to_safetensors

    with user_errors():
        count = dequantize_to_safetensors(output_dir, target, original=not function_layout)
        print(f"wrote {count} tensors to {target}")


def _eval_progress(enabled: bool):
    """A progress bar on stderr when it is a terminal (stdout keeps only results): the stage
    (loading, tokenizing), then the chunks; returns ``(context manager, stage, callback)``."""
    if not enabled:
        return contextlib.nullcontext(), lambda text: None, None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"), TimeElapsedColumn(),
        TimeRemainingColumn(), console=Console(stderr=True), transient=True,
    )
    task = progress.add_task("loading", total=None)

    def stage(text: str) -> None:
        progress.update(task, description=text)

    def callback(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total, description="evaluating")

    return progress, stage, callback


def eval_lines(result: dict) -> list[str]:
    """The human-readable result of ``qstrat eval``, as llama-perplexity words its figures."""
    lines = [
        f"model:      {result['model']}",
        f"text:       {result['text']}: {result['tokens']} tokens; {result['chunks']} chunks of {result['ctx']}, "
        f"{result['scored_tokens']} tokens scored (BOS {'put first in each chunk' if result['add_bos'] else 'not added: the vocabulary adds none'})",
        f"engine:     {result['engine']}{', flash attention' if result['flash_attn'] else ''}",
        f"perplexity: {result['perplexity']:.4f} ± {result['perplexity_uncertainty']:.4f}",
    ]
    if result["reference"] is not None:
        lines += [
            f"reference:  {result['reference']}",
            f"reference perplexity: {result['reference_perplexity']:.4f} ± {result['reference_perplexity_uncertainty']:.4f}",
            f"KL divergence (reference || model): mean {result['kl_divergence']:.6f} ± {result['kl_divergence_uncertainty']:.6f}, "
            f"median {result['kl_divergence_median']:.6f}, 99th percentile {result['kl_divergence_p99']:.6f}",
            f"same top token: {100 * result['top1_agreement']:.3f} ± {100 * result['top1_agreement_uncertainty']:.3f} %",
            f"RMS Δp:     {100 * result['rms_dp']:.3f} ± {100 * result['rms_dp_uncertainty']:.3f} %",
        ]
    return lines


ENGINES = ("auto", "llama.cpp", "numpy")


def _open_engine(path: Path, ctx: int, threads: int | None, flash_attn: bool, engine: str, stack: contextlib.ExitStack, what: str):
    """The engine that evaluates ``path`` and its description: llama.cpp for a GGUF file (unless
    ``engine`` is numpy), qstrat's numpy forward for a Hugging Face model (directory or
    .safetensors file) or a qstrat output directory, or when asked."""
    from qstrat import llama_engine

    if engine not in ENGINES:
        raise InputError(f"--engine {engine}: one of {', '.join(ENGINES)}")
    if not path.exists():
        raise InputError(f"{path}: no such file or directory ({what})")
    if engine == "llama.cpp" or (engine == "auto" and not path.is_dir() and path.suffix != ".safetensors"):
        model = llama_engine.LlamaCppModel(path, ctx, threads, flash_attn)
        stack.callback(model.close)
        return model, llama_engine.engine_name()
    from qstrat.forward import open_forward

    forward, vocabulary = stack.enter_context(open_forward(path))
    tokenizer = llama_engine.LlamaCppTokenizer(vocabulary, what)
    stack.callback(tokenizer.close)
    return llama_engine.NumpyModel(forward, tokenizer, path), "qstrat's numpy forward (float32; tokens by llama.cpp's tokenizer)"


def _read_text(text: Path) -> bytes:
    from qstrat.evaluate import text_from_file

    try:
        data = text.read_bytes()
    except OSError as err:
        raise InputError(f"{text}: cannot read the text ({err.strerror or err})") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        # llama.cpp's tokenizers would read each bad byte as U+FFFD, silently: another text
        raise InputError(f"{text}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                         "convert it first, e.g. iconv -f latin1 -t utf-8") from None
    return text_from_file(data)


def _warn_beyond_training_context(model: Path, engine: object, ctx: int) -> None:
    """A warning when --ctx exceeds the context the model was trained on (llama-perplexity's too)."""
    trained = getattr(engine, "n_ctx_train", None)
    if trained and ctx > trained:
        print(f"warning: {model} was trained on contexts of {trained} tokens, --ctx is {ctx}", file=sys.stderr)


def _check_counts(**flags: tuple[int | None, int]) -> None:
    for flag, (value, least) in flags.items():
        if value is not None and value < least:
            raise InputError(f"--{flag} {value}: at least {least}")


@app.command(name="eval")
def eval_(
    model: Path = typer.Argument(..., help="the model: a GGUF file, a Hugging Face model (directory or .safetensors) or a qstrat output directory"),
    text: Path = typer.Option(..., "--text", "-t", help="a text file (UTF-8); e.g. python -m qstrat.corpus wiki.txt"),
    reference: Path = typer.Option(None, "--reference", "-r", help="a model of the same vocabulary to compare with (KL divergence, top-1 agreement, RMS Δp)"),
    ctx: int = typer.Option(512, "--ctx", "-c", help="tokens per chunk (llama-perplexity's --ctx-size)"),
    chunks: int = typer.Option(None, "--chunks", help="at most this many chunks (default: all the text gives)"),
    engine: str = typer.Option("auto", "--engine", help="auto: llama.cpp for a GGUF file, qstrat's numpy forward for the others; llama.cpp; numpy (Llama family: the way to evaluate Q8_K, which llama.cpp cannot run)"),
    threads: int = typer.Option(None, "--threads", help="llama.cpp threads (default: every core)"),
    flash_attn: bool = typer.Option(False, "--flash-attn", help="llama.cpp's flash attention (off: llama-cpp-python's default; llama-perplexity's auto turns it on on a CPU)"),
    json_output: bool = typer.Option(False, "--json", help="print one machine-readable result line"),
) -> None:
    """Perplexity of MODEL over a text, and with --reference the KL divergence from a reference
    model, as llama.cpp's llama-perplexity computes them: by llama.cpp (llama-cpp-python) for a
    GGUF file, by qstrat's numpy forward for a Hugging Face model or a qstrat output directory
    (the output names the engine).

    The text is tokenized once (BOS only if the vocabulary adds one) and cut into chunks of --ctx
    tokens; in each, evaluated from an empty context, the second half of the positions predict the
    next token.  Needs at least two chunks of text.  Results go to stdout; a progress bar to
    stderr when it is a terminal.
    """
    from qstrat.evaluate import evaluate

    with user_errors(), contextlib.ExitStack() as stack:
        data = _read_text(text)
        _check_counts(ctx=(ctx, 4), chunks=(chunks, 1), threads=(threads, 1))
        bar, stage, callback = _eval_progress(sys.stderr.isatty())
        with bar:
            stage("loading")
            llm, engine_used = _open_engine(model, ctx, threads, flash_attn, engine, stack, "model")
            ref = None
            if reference is not None:
                ref, reference_engine = _open_engine(reference, ctx, threads, flash_attn, engine, stack, "reference")
                if reference_engine != engine_used:
                    engine_used = f"{engine_used}; reference: {reference_engine}"
            if ref is not None and ref.n_vocab != llm.n_vocab:
                raise InputError(
                    f"{reference}: a vocabulary of {ref.n_vocab} tokens, the model's ({model}) has {llm.n_vocab}: "
                    "the KL divergence needs the same vocabulary"
                )  # before the text is tokenized; evaluate compares the tokens too
            for path, engine_model in ((model, llm), (reference, ref)):
                if engine_model is not None and engine_model.add_eos:
                    raise InputError(f"{path}: its vocabulary adds EOS to a text, which llama-perplexity refuses too")
            _warn_beyond_training_context(model, llm, ctx)
            stage("tokenizing")
            figures = evaluate(llm, data, ctx=ctx, chunks=chunks, reference=ref, progress=callback, source=str(text),
                               reference_name=str(reference), model_name=str(model))
        result = {
            **figures, "flash_attn": flash_attn, "engine": engine_used, "model": str(model), "reference": None if reference is None else str(reference),
            "text": str(text),
        }
        if json_output:
            print(json.dumps(result))
        else:
            print("\n".join(eval_lines(result)))


@app.command()
def imatrix(
    model: Path = typer.Argument(..., help="the model: a GGUF file, a Hugging Face model or a qstrat output directory (Llama family), or a BERT model"),
    text: Path = typer.Option(..., "--text", "-t", help="a text file (UTF-8); e.g. python -m qstrat.corpus wiki.txt"),
    output: Path = typer.Option(..., "--output", "-o", help="the importance matrix to write, in llama.cpp's GGUF imatrix format"),
    ctx: int = typer.Option(512, "--ctx", "-c", help="tokens per chunk (llama-imatrix's --ctx-size)"),
    chunks: int = typer.Option(None, "--chunks", help="at most this many chunks (default: all the text gives)"),
    json_output: bool = typer.Option(False, "--json", help="print one machine-readable result line"),
) -> None:
    """Collect an importance matrix of MODEL over a text, as llama.cpp's llama-imatrix does: per
    matrix of the model's layers, the sum of the squares of each input column over every token,
    and the token count.  Computed by qstrat's numpy forward; tokens by llama.cpp's tokenizer.

    The text is cut into chunks of --ctx tokens (BOS first when the vocabulary adds one), as
    llama-imatrix cuts it; at least two chunks are needed.  A BERT model (Hugging Face directory):
    its encoder's linear layers, each chunk as one sequence from [CLS] to [SEP], tokens by its
    tokenizer.json.  Give the file to a run with the config
    key imatrix: (or to llama-quantize --imatrix).
    """
    from qstrat.imatrix import MIN_BATCH_TOKENS, compute_imatrix, write_imatrix

    with user_errors(), contextlib.ExitStack() as stack:
        data = _read_text(text)
        _check_counts(ctx=(ctx, MIN_BATCH_TOKENS), chunks=(chunks, 1))
        bar, stage, callback = _eval_progress(sys.stderr.isatty())
        with bar:
            stage("loading")
            from qstrat.bert import BertEngine, is_bert

            if is_bert(model):
                engine, engine_used = BertEngine(model), "qstrat's numpy BERT forward (float64; tokens by the model's tokenizer.json)"
            else:
                engine, engine_used = _open_engine(model, ctx, None, False, "numpy", stack, "model")
            _warn_beyond_training_context(model, engine, ctx)
            stage("tokenizing")
            collected = compute_imatrix(engine, data, ctx, chunks, str(text), callback)
        write_imatrix(output, collected)
        result = {
            "model": str(model), "text": str(text), "output": str(output), "engine": engine_used, "ctx": ctx,
            "chunks": collected.chunk_count, "tokens": collected.tokens, "matrices": len(collected.entries),
        }
        if json_output:
            print(json.dumps(result))
        else:
            print(f"wrote {output}: {result['matrices']} matrices, {result['chunks']} chunks of {ctx} tokens ({result['tokens']} tokens) by {engine_used}")


@app.command()
def version() -> None:
    """Print the qstrat version."""
    print(__version__)


def quiet_openmp_threads() -> None:
    """Numba's OpenMP threads otherwise spin between kernel calls, taking a core from the threads
    that write files meanwhile (a run took 10 % longer). A user's own setting wins; worker
    processes inherit it. Only the commands set it: the library leaves a host program's OpenMP alone."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run_command(app: typer.Typer) -> None:
    """Run a command line app as a process: quiet OpenMP threads, Ctrl-C and SIGTERM as a stop
    request (qstrat.interrupts), and a quick exit.

    Numba's compiler leaves hundreds of thousands of objects behind, and the garbage
    collections of interpreter shutdown walked them all (about 0.2 s per command).
    Freezing them first skips that walk: atexit handlers and flushes still run, only objects
    caught in reference cycles are no longer finalized (every output is closed explicitly).
    """
    quiet_openmp_threads()
    handle_stop_signals()
    try:
        app()
    finally:
        ignore_stop_signals()
        gc.freeze()


def main() -> None:
    run_command(app)
