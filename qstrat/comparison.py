"""``qstrat compare``: one model quantized every way asked -- block type (or llama.cpp preset) x
strategy chain x importance matrix -- and the results side by side: size, weight error and, with a
text, the perplexity and KL divergence the quantized model gives.

Without a text every case is quantized in memory (nothing is written).  With one, each case is
written to a temporary directory, read back with every permutation undone, and evaluated by qstrat's
numpy forward against the source model on the same tokens (one engine for every type, the original
tool's Q8_K included, which llama.cpp cannot run).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from qstrat.blocks import DEFAULT_VARIANT
from qstrat.errors import ConfigError, InputError
from qstrat.io.names import storage_type_name
from qstrat.results import QuantizationResult, TensorRecord
from qstrat.runconfig import RunConfig

#: the figures of ``qstrat eval`` a comparison row keeps
EVAL_FIELDS = ("perplexity", "perplexity_uncertainty", "kl_divergence", "kl_divergence_uncertainty", "top1_agreement",
               "reference_perplexity")


@dataclass(frozen=True)
class Case:
    """One way of quantizing the model."""

    format: str  # a block type (format:) or a llama.cpp file type (preset:)
    chain_label: str
    chain: tuple[str, ...]
    imatrix: Path | None

    @property
    def label(self) -> str:
        return f"{self.format} {self.chain_label}" + (" +imatrix" if self.imatrix else "")


def format_settings(name: str) -> dict[str, str]:
    """``{"format": name}`` for a block type, ``{"preset": name}`` for one of llama.cpp's file types
    (a name that is both, like q8_0, is the block type: the same tensors as the pure file type)."""
    from qstrat.formats import FORMATS
    from qstrat.presets import preset_names

    key = name.strip().lower()
    if key in FORMATS:
        return {"format": key}
    if key in preset_names():
        return {"preset": key}
    raise InputError(f"--formats: {name!r} is neither a block type ({', '.join(FORMATS)}) nor a llama.cpp file type ({', '.join(preset_names())})")


def cases(formats: Sequence[str], chains: dict[str, list[str]], imatrix: Path | None) -> list[Case]:
    """Every combination, format first; with an importance matrix each also without one."""
    for name in formats:
        format_settings(name)
    importance = [None, imatrix] if imatrix is not None else [None]
    return [Case(f.strip().lower(), label, tuple(chain), i) for f in formats for label, chain in chains.items() for i in importance]


def case_config(case: Case, variant: str, workers: int) -> RunConfig:
    data = {
        "strategies": list(case.chain), "variant": variant, **format_settings(case.format),
        "parallel": {"workers": workers},
        **({"imatrix": str(case.imatrix)} if case.imatrix else {}),
    }
    return RunConfig.build(data, f"compare ({case.label})")


def stored_bytes(record: TensorRecord) -> int:
    """Bytes of a quantized tensor's blocks in its type (run-time permutations aside)."""
    from qstrat.formats import block_type
    from qstrat.io.safetensors import stacked_rows

    rows, k = stacked_rows(record.shape), record.shape[-1]
    return rows * block_type(storage_type_name(record.storage)).row_bytes(k)


def size_figures(result: QuantizationResult) -> dict[str, float | int]:
    """Bits per weight of the quantized tensors, and the model's size with the others as stored."""
    quantized = sum(stored_bytes(r) for r in result.quantized)
    values = sum(r.nbytes // (4 if r.dtype == "F32" else 2) for r in result.quantized)
    others = sum(r.nbytes for r in result.tensors if not r.quantized)
    return {"bits_per_weight": 8 * quantized / values if values else None, "model_bytes": quantized + others}


@contextlib.contextmanager
def _reference_engine(model: Path) -> Iterator:
    from qstrat.forward import open_forward
    from qstrat.llama_engine import LlamaCppTokenizer, NumpyModel

    with open_forward(model) as (forward, vocabulary):
        tokenizer = LlamaCppTokenizer(vocabulary, "model")
        try:
            yield NumpyModel(forward, tokenizer, model)
        finally:
            tokenizer.close()


def compare_model(
    model: str | Path,
    case_list: Sequence[Case],
    *,
    variant: str = DEFAULT_VARIANT,
    workers: int = 1,
    text: bytes | None = None,
    ctx: int = 512,
    chunks: int | None = None,
    text_name: str = "the text",
    announce: Callable[[int, int, Case], None] | None = None,
) -> tuple[list[dict[str, object]], dict[str, QuantizationResult]]:
    """One row per case (its settings, :func:`qstrat.report.summarize`'s figures, the sizes and,
    with ``text``, the evaluation), and the results by case label.  ``announce(i, n, case)`` is
    called before each case.  A case a run refuses (a run-time permutation for a model written
    for llama.cpp, say) gets a row with its ``error``."""
    from qstrat.evaluate import chunk_count, evaluate
    from qstrat.pipelines.run import evaluate_model, quantize_model
    from qstrat.report import summarize

    model = Path(model)
    rows, results = [], {}
    with contextlib.ExitStack() as stack:
        reference = stack.enter_context(_reference_engine(model)) if text is not None else None
        if reference is not None:  # a text too short for --ctx stops the comparison now, not after a case's run
            chunk_count(len(reference.tokenize(text)), ctx, chunks, text_name)
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qstrat-compare-"))) if text is not None else None
        for index, case in enumerate(case_list):
            if announce is not None:
                announce(index, len(case_list), case)
            row: dict[str, object] = {"format": case.format, "chain": case.chain_label, "imatrix": case.imatrix is not None}
            config = case_config(case, variant, workers)  # a bad option (--variant) stops the comparison
            try:
                if text is None:
                    result = evaluate_model(model, config, outputs=config.output_kinds)  # refused as a run would be
                else:
                    out = scratch / f"case{index}"
                    outputs = ("q8k",) if config.output_kinds == ("q8k",) else ("gguf",)
                    result = quantize_model(model, config.evaluated(), out, outputs=outputs)
            except ConfigError as err:
                rows.append({**row, "error": str(err)})
                continue
            results[case.label] = result
            summary = summarize(result)
            row["imatrix_summary"] = summary.pop("imatrix", None)
            row.update(summary)
            row.update(size_figures(result))
            if text is not None:
                with _reference_engine(out) as engine:
                    figures = evaluate(engine, text, ctx=ctx, chunks=chunks, reference=reference, source=text_name)
                row.update({key: figures[key] for key in EVAL_FIELDS})
                shutil.rmtree(out, ignore_errors=True)
            rows.append(row)
    return rows, results


def render_comparison(model: str, rows: Sequence[dict[str, object]], evaluated: str | None = None) -> str:
    """The comparison as a Markdown table (``evaluated``: what the figures of the text were computed on)."""
    from qstrat.report import _fmt
    with_imatrix = any(r["imatrix"] for r in rows)
    # a GGUF input's tensors copied in their type are exact, left out of the mean SQNR: say how many
    with_copies = any(r.get("copied_count") for r in rows)
    head = ["format", "chain"] + (["imatrix"] if with_imatrix else []) + ["quantized"] + (["copied exact"] if with_copies else []) + [
        "bits/weight", "model MB", "mean SQNR dB", "worst SQNR dB"]
    head += ["weighted SQNR dB"] if with_imatrix else []
    head += ["sum test MSE", "gradient test MSE", "runtime perms", "joint perms"]
    head += ["perplexity", "KL divergence", "same top token"] if evaluated else []
    lines = [f"# Comparison: {model}", ""]
    if evaluated:
        lines += [evaluated, ""]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [str(r["format"]), str(r["chain"])] + (["yes" if r["imatrix"] else "no"] if with_imatrix else [])
        if "error" in r:
            lines.append("| " + " | ".join(cells + [f"refused: {r['error']}"] + [""] * (len(head) - len(cells) - 1)) + " |")
            continue
        weighted = (r.get("imatrix_summary") or {}).get("mean_weighted_sqnr_db")
        cells += [str(r["tensor_count"])] + ([str(r.get("copied_count", 0))] if with_copies else [])
        cells += [_fmt(r["bits_per_weight"], ".3f"), _fmt(r["model_bytes"] / 1e6, ".2f"),
                  _fmt(r["mean_sqnr_db"], ".2f"), _fmt(r["worst_sqnr_db"], ".2f")]
        cells += [_fmt(weighted, ".2f")] if with_imatrix else []
        cells += [_fmt(r["average_sum_test_mse"], ".3e"), _fmt(r["average_gradient_test_mse"], ".3e"),
                  str(r["runtime_permutations"]), str(r["joint_permutations"])]
        if evaluated:
            cells += [f"{_fmt(r['perplexity'], '.4f')} ± {_fmt(r['perplexity_uncertainty'], '.4f')}",
                      f"{_fmt(r['kl_divergence'], '.5f')} ± {_fmt(r['kl_divergence_uncertainty'], '.5f')}",
                      f"{_fmt(100 * r['top1_agreement'], '.2f')} %"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["Case", "cases", "compare_model", "format_settings", "render_comparison", "size_figures"]
