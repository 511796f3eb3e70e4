"""Reports of a run: ``report.json``, a readable ``report.md`` and, with the ``plot`` extra, a PNG.

The report holds timings, so unlike the manifest it differs between identical runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from qstrat.io.atomic import atomic_writer
from qstrat.io.q8k import WrittenFile
from qstrat.results import QuantizationResult

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_PNG = "report.png"
MAX_LABELLED_TENSORS = 80


def _mean(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _importance_summary(result: QuantizationResult) -> dict[str, object]:
    """With an importance matrix: which quantized tensors had a vector, and the weighted error."""
    records = [r for r in result.quantized if r.imatrix is not None]
    if not records:
        return {}
    weighted = [r.metrics.weighted_sqnr_db for r in records if r.metrics is not None and r.metrics.weighted_sqnr_db is not None]
    return {
        "imatrix": {
            "used": sum(bool(r.imatrix) for r in records),
            "missing": sorted(r.name for r in records if not r.imatrix),
            "mean_weighted_sqnr_db": "inf" if weighted and min(weighted) == math.inf else _mean(weighted),
        }
    }


def describe_importance(summary: Mapping[str, object], path: object) -> str | None:
    """The line saying which importance matrix a run used, and for which tensors it had none."""
    use = summary.get("imatrix")
    if not use:  # a run with one whose quantized tensors all kept the input's blocks, which used none
        copied = summary.get("copied_count") or 0
        return None if path is None or not copied else (
            f"importance matrix {path}: used for no tensor, since all {copied} quantized tensors were copied as the input stored them")
    missing = use["missing"]
    none_for = f"; none for {len(missing)}: {', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}" if missing else ""
    return f"importance matrix {path}: vectors for {use['used']} tensors{none_for} (quantized without one)" if missing else (
        f"importance matrix {path}: vectors for all {use['used']} quantized tensors")


def quantized_output_bytes(result: QuantizationResult) -> int:
    """The quantized tensors' bytes in the output: their .q8k and .perm files, and the blocks of their
    .qblk files without its header (what a GGUF holds of them; the headers made a copied model "larger")."""
    from qstrat.io.qblock import QBLK_HEADER

    return sum(f.size - (QBLK_HEADER.size if role == "blocks" else 0)
               for r in result.quantized for role, f in r.files.items() if role in ("q8k", "blocks", "perm"))


def summarize(result: QuantizationResult) -> dict[str, object]:
    """Per-model figures: counts, averages and extremes of the metrics, sizes, time."""
    metrics = [r.metrics for r in result.quantized if r.metrics is not None]
    sqnr = [m.sqnr_db for m in metrics if m.sqnr_db is not None]
    stored = quantized_output_bytes(result)
    source = sum(r.source_nbytes for r in result.quantized)
    formats: dict[str, int] = {}
    for r in result.quantized:
        formats[r.storage] = formats.get(r.storage, 0) + 1
    return {
        "tensor_count": result.tensor_count,
        "formats": dict(sorted(formats.items())),  # storage -> tensors: q8k (.q8k files) or a GGUF type
        "fallbacks": [
            {"tensor": r.name, "asked": r.fallback_from, "written": r.storage, "row_length": r.shape[-1]}
            for r in result.quantized
            if r.fallback_from
        ],
        **_importance_summary(result),
        # a GGUF input's tensors already in the type asked for, written as they were (as llama.cpp does)
        "copied_count": sum(r.copied for r in result.quantized),
        "skipped_count": result.skipped_count,
        "average_mse": None if math.isnan(result.average_mse) else result.average_mse,
        # exact tensors (infinite SQNR) are left out of the mean; JSON has no infinity: "inf"
        "mean_sqnr_db": "inf" if sqnr and min(sqnr) == math.inf else _mean(sqnr),
        "worst_sqnr_db": ("inf" if min(sqnr) == math.inf else min(sqnr)) if sqnr else None,
        "average_sum_test_mse": _mean([m.sum_test_mse for m in metrics]),
        "average_gradient_test_mse": _mean([m.gradient_test_mse for m in metrics]),
        "quantized_source_bytes": source,
        "quantized_output_bytes": stored,
        "runtime_permutations": sum(r.permutation == "runtime" for r in result.quantized),
        "joint_permutations": sum(r.permutation == "joint" for r in result.tensors),
        "threshold_failures": [f.as_dict() for f in result.failures],
        "elapsed_s": round(result.elapsed_s, 3),
        **({"gguf": result.container} if result.container is not None else {}),
        **({"residual_stream": result.residual} if result.residual is not None else {}),
        **({"notes": list(result.notes)} if result.notes else {}),
        **({"zeroed": line} if (line := zeroed(result)) else {}),
    }


def describe_residual_choice(residual: Mapping[str, object]) -> str:
    """The line saying which order residual_stream chose and what it gained."""
    if residual["order"] == "identity":
        return (f"Residual stream: left in its order: no order tried was better for every one of the "
                f"{residual['readers']} quantized matrices that read it (report.json: summary.residual_stream).")
    gain = residual["mean_gain_db"]
    measured = f"{gain:+.2f} dB" if isinstance(gain, float) else "no gain"
    return (f"Residual stream ({residual['tensors']} tensors permuted): order {residual['order']}; "
            f"{measured} mean weight SQNR over the {residual['readers']} quantized matrices that read it, none worse than without.")


def describe_container(container: Mapping[str, object]) -> list[str]:
    """Lines saying what a run's GGUF file is: a model llama.cpp runs, or not and why; then its notes."""
    if container["llama_cpp"]:
        head = (f"{container['file']}: a llama.cpp model (architecture {container['architecture']}, "
                f"vocabulary: {container['vocabulary']})")
    else:
        head = f"{container['file']}: not a llama.cpp model: {container['reason']}"
    return [head] + [f"{container['file']}: {note}" for note in container.get("notes") or ()]


def byte_size(count: int) -> str:
    """A size for a sentence: ``840 bytes``, ``55 kB``, ``1.4 MB``, ``13 GB`` (two significant figures at least)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            value = count / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{count} bytes"


def stacked_passthrough(tensors: Mapping[str, object], reasons: Mapping[str, str]) -> str | None:
    """A sentence when weights of more than two dimensions that a run passes through unquantized
    (``reasons``: name -> why, of the tensors it does not quantize) are a tenth of the model or more:
    a MoE model's stacked experts are most of it (a vision tower's convolutions are not worth a nightly
    warning).  Said before the run starts, not only in its size warning at the end, which an F32
    input's run does not even reach (``tensors``: name -> TensorInfo)."""
    from qstrat.io.safetensors import FLOAT_DTYPES

    stacked = sorted(name for name, info in tensors.items() if name in reasons
                     and len(info.shape) > 2 and name.endswith(".weight") and (info.encoding or info.dtype in FLOAT_DTYPES))
    written = sum(tensors[name].nbytes for name in stacked)
    if not stacked or written < 0.1 * sum(info.nbytes for info in tensors.values()):
        return None
    stored = sum(tensors[name].stored_nbytes if tensors[name].encoding else tensors[name].nbytes for name in stacked)
    decoded = any(tensors[name].encoding for name in stacked)
    names = ", ".join(stacked[:3]) + (", ..." if len(stacked) > 3 else "")
    many = len(stacked) != 1
    such = ", such as a MoE model's experts" if any(len(tensors[name].shape) == 3 for name in stacked) else ""
    return (f"{len(stacked)} weight tensor{'s' if many else ''} of more than two dimensions{such} ({names}){',' if such else ''} "
            f"{'are' if many else 'is'} not quantized ({stacked[0]}: {reasons[stacked[0]]}) but passed through"
            f"{', decoded to F32' if decoded else ''}: {byte_size(stored)} in the input, {byte_size(written)} in the output")


def larger_than_input(result: QuantizationResult, input_bytes: int) -> str | None:
    """A sentence when the output's tensor files (not its reports or manifest, whose few kB made every
    tiny model "larger") take a quarter more room than the input, or more, saying why: the
    tensors passed through (Q8K of a GGUF model whose rows are not 256 long keeps most of it unquantized,
    decoded to F32; the commonest reason, by their bytes), or the quantized ones, when their type takes
    more room than the input's (Q4_1 to Q8_0).  Below that, reports and a manifest beside an output that
    passes most tensors through unchanged say nothing surprising."""
    output_bytes = sum({f.path: f.size for r in result.tensors for f in r.files.values()}.values())
    if output_bytes <= 1.25 * input_bytes:
        return None
    head = f"the output ({byte_size(output_bytes)}) is larger than the input ({byte_size(input_bytes)}): "
    passed = [r for r in result.tensors if not r.quantized]
    quantized_in = sum(r.source_nbytes for r in result.quantized)
    quantized_out = quantized_output_bytes(result)
    if quantized_out - quantized_in > sum(r.nbytes for r in passed):
        types = ", ".join(sorted({r.storage for r in result.quantized}))
        return head + (f"its {len(result.quantized)} quantized tensors take {byte_size(quantized_out)} in {types}, "
                       f"against {byte_size(quantized_in)} as the input stored them")
    by_reason = Counter()
    for record in passed:
        by_reason[record.reason or "not quantized"] += record.nbytes
    reason = by_reason.most_common(1)[0][0] if by_reason else None
    return head + f"{len(passed)} of {len(result.tensors)} tensors are stored unquantized" + (f", most of them by bytes because {reason}" if reason else "")


def zeroed(result: QuantizationResult) -> str | None:
    """A sentence when quantized tensors came back all zeros though their values were not: weights
    below about 5e-8 are too small for a type's float16 scales (or for F16 itself), and GGML writes
    zeros for them, as qstrat does, so the bytes are right and the tensor is lost.  Known from the
    measured error (the whole tensor's: a reconstruction of zeros has cosine 0 and relative error 1)."""
    lost = [r for r in result.quantized if r.metrics is not None and r.metrics.cosine == 0.0 and r.metrics.relative_error == 1.0]
    if not lost:
        return None
    first = lost[0]
    names = ", ".join(r.name for r in lost[:3]) + (", ..." if len(lost) > 3 else "")
    return (f"{len(lost)} quantized tensor(s) came out all zeros ({names}): {first.name}'s largest |value| "
            f"{first.metrics.max_abs_error:.1e} is too small for {first.storage}, whose float16 scales (or values) GGML "
            "flushes to zero too; a format_rules entry can keep such tensors in f32 or bf16")


def build_report(result: QuantizationResult, model: str, settings: Mapping[str, object]) -> dict[str, object]:
    tensors = {}
    failed = {f.name for f in result.failures}
    for r in result.tensors:
        entry = r.manifest_entry().model_dump(exclude={"files"})
        entry["seconds"] = round(r.seconds, 4)
        if r.quantized:
            entry["threshold_failed"] = r.name in failed
        tensors[r.name] = entry
    return {"model": model, "settings": dict(settings), "summary": summarize(result), "tensors": tensors}


def describe_copied(count: int) -> str:
    """The line saying how many of a GGUF input's tensors were copied rather than requantized."""
    return (f"{count} tensor{'s' if count != 1 else ''} already in the type asked for in the input GGUF: "
            "copied as they were, not requantized (as llama.cpp does; exact against the input)")


def describe_formats(formats: Mapping[str, int]) -> str:
    """``q4_k 10, q6_k 2``: tensors per stored format."""
    return ", ".join(f"{name} {count}" for name, count in formats.items()) or "none"


def _fmt(value, spec):
    if value is None:
        return "—"
    if value == "inf" or value == math.inf:
        return "exact"
    return format(value, spec)


def _db(value) -> str:
    """A SQNR in a sentence: ``31.25 dB``, or ``exact``."""
    text = _fmt(value, ".2f")
    return text if text in ("—", "exact") else f"{text} dB"


def render_markdown(report: Mapping[str, object]) -> str:
    s = report["summary"]
    validation = report["settings"].get("validation", {})
    settings = report["settings"]
    imatrix_path = (settings.get("imatrix") or {}).get("path")
    # what the run was asked for: a preset, a block type, or Q8K (the default), whose rounding variant
    # matters only where Q8K blocks are written
    asked = (f"Preset `{settings['preset']}`" if settings.get("preset") else f"Format `{settings.get('format') or 'q8k'}`")
    if "q8k" in s["formats"]:
        asked += f", Q8K variant `{settings.get('variant')}`"
    lines = [
        f"# Quantization report: {report['model']}",
        "",
        f"{asked}; strategies "
        f"{', '.join(e['name'] for e in report['settings'].get('strategies', []))}; validation stages "
        f"{', '.join(validation.get('stages', [])) or 'off'}, matrix-vector product computed "
        f"{'as Candle does (input quantized to Q8K)' if validation.get('product') == 'candle' else 'with exact dequantized weights'}.",
        "",
        f"- {s['tensor_count']} tensors quantized ({describe_formats(s['formats'])}), {s['skipped_count']} passed through, "
        f"in {s['elapsed_s']} s",
        *[
            f"- fallback: {f['tensor']} is {f['written']}: {f['asked']} cannot take rows of {f['row_length']} (llama.cpp's rule)"
            for f in s["fallbacks"]
        ],
        *([f"- {describe_copied(s['copied_count'])}"] if s.get("copied_count") else []),
        *([f"- {describe_importance(s, imatrix_path)}, importance-weighted SQNR mean {_db(s['imatrix']['mean_weighted_sqnr_db'])}"]
          if "imatrix" in s else [f"- {line}"] if (line := describe_importance(s, imatrix_path)) else []),
        *([f"- {describe_residual_choice(s['residual_stream'])}"] if "residual_stream" in s else []),
        f"- weight MSE (mean) {_fmt(s['average_mse'], '.3e')}, SQNR mean {_db(s['mean_sqnr_db'])}, "
        f"worst {_db(s['worst_sqnr_db'])}",
        f"- sum test MSE (mean) {_fmt(s['average_sum_test_mse'], '.3e')}, gradient test MSE (mean) "
        f"{_fmt(s['average_gradient_test_mse'], '.3e')}",
        f"- quantized tensors: {s['quantized_source_bytes']:,} bytes in, {s['quantized_output_bytes']:,} bytes out",
        f"- {len(s['threshold_failures'])} tensor(s) below a threshold",
        *[f"- GGUF {line}" for line in (describe_container(s["gguf"]) if "gguf" in s else [])],
        *[f"- warning: {note}" for note in s.get("notes", [])],
        *([f"- warning: {s['zeroed']}"] if "zeroed" in s else []),
        "",
        "| tensor | shape | format | strategy | permutation | SQNR dB | MSE | max abs err | cosine | sum test | gradient test | |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, t in report["tensors"].items():
        if t["storage"] == "passthrough":
            continue
        m = t.get("metrics") or {}
        lines.append(
            f"| {name} | {'x'.join(map(str, t['shape']))} | {t['storage']} | {t['strategy']} | {t['permutation']} | "
            f"{_fmt(m.get('sqnr_db'), '.2f')} | {_fmt(m.get('mse'), '.2e')} | {_fmt(m.get('max_abs_error'), '.2e')} | "
            f"{_fmt(m.get('cosine'), '.6f')} | {_fmt(m.get('sum_test_mse'), '.2e')} | {_fmt(m.get('gradient_test_mse'), '.2e')} | "
            f"{'**below threshold**' if t.get('threshold_failed') else ''} |"
        )
    passed = [n for n, t in report["tensors"].items() if t["storage"] == "passthrough"]
    lines += ["", f"Passed through unchanged: {len(passed)} tensors (see manifest.json for why each)."]
    return "\n".join(lines) + "\n"


def preload_plotting() -> threading.Thread:
    """Import matplotlib on a background thread (a third of a second), so that the report
    plot at the end of a run does not wait for it; the kernels release the GIL meanwhile."""

    def load() -> None:
        with contextlib.suppress(ImportError):
            import matplotlib.figure  # noqa: F401

    thread = threading.Thread(target=load, name="qstrat-preload-matplotlib", daemon=True)
    thread.start()
    return thread


def plot_sqnr(series: Mapping[str, Mapping[str, float]], target: Path, title: str) -> WrittenFile | None:
    """Per-tensor SQNR, one marker series per strategy chain; None without matplotlib."""
    try:
        # the Figure API alone: no pyplot (a third of the import time), no global state
        from matplotlib.figure import Figure
    except ImportError:
        return None
    names = sorted({n for values in series.values() for n in values})
    labelled = len(names) <= MAX_LABELLED_TENSORS  # beyond that, a readable axis is the tensor index
    figure = Figure(figsize=(max(8, 0.35 * len(names) + 3) if labelled else 14, 5))
    axis = figure.subplots()
    for label, values in series.items():
        axis.plot(range(len(names)), [values.get(n, math.nan) for n in names], marker="o" if labelled else "",
                  linestyle="-", label=label)
    if labelled:
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels([n.replace("model.layers.", "L").replace(".weight", "") for n in names], rotation=75, ha="right", fontsize=7)
    else:
        axis.set_xlabel(f"tensor (index in name order, {len(names)} tensors)")
    axis.set_ylabel("weight SQNR (dB), higher is better")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    with atomic_writer(target) as out:
        figure.savefig(out, format="png", dpi=110)
    return WrittenFile(target.name, out.size, out.sha256)


def sqnr_series(result: QuantizationResult) -> dict[str, float]:
    return {
        r.name: r.metrics.sqnr_db
        for r in result.quantized
        if r.metrics is not None and r.metrics.sqnr_db is not None and math.isfinite(r.metrics.sqnr_db)
    }


def _write(path: Path, data: bytes) -> WrittenFile:
    with atomic_writer(path) as out:
        out.write(data)
    return WrittenFile(path.name, out.size, out.sha256)


def write_reports(
    result: QuantizationResult, model: str, settings: Mapping[str, object], directory: Path
) -> list[WrittenFile]:
    """report.json, report.md and (if matplotlib is installed) report.png into ``directory``."""
    report = build_report(result, model, settings)
    written = [
        _write(directory / REPORT_JSON, json.dumps(report, indent=1, sort_keys=True, allow_nan=False).encode() + b"\n"),
        _write(directory / REPORT_MD, render_markdown(report).encode()),
    ]
    chain = "+".join(e["name"] for e in settings.get("strategies", []))
    png = plot_sqnr({chain: sqnr_series(result)}, directory / REPORT_PNG, f"{model}: SQNR per tensor")
    if png is not None:
        written.append(png)
    return written
