"""residual_stream: one permutation of the hidden dimension through the whole model.

Every layer reads and writes the residual stream, and everything that touches it is
permutation-equivariant once its weights move too: RMSNorm and LayerNorm (weight and bias
permuted), the input columns of every matrix that reads it (q, k, v, gate, up, the output head,
BERT's pooler), the output rows and biases of every matrix that writes it (o, down), the
embeddings' columns.  Permuting all of them with one order leaves the model's function exactly
as it was (RPTQ and PeRQ fold permutations into a model this way): the result is an ordinary
model that any engine runs.  Only the readers' blocks change (a row permutation moves whole
rows, and blocks never cross rows), so the order is chosen by the readers' actual quantization
error in their target types, and it is never worse than identity for any of them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from qstrat.errors import ConfigError
from qstrat.kernels import column_sq_norms
from qstrat.strategies.base import Candidate, Permutation, QuantizationStrategy, SquaredError, descending_order, gain_db
from qstrat.strategies.search import DEFAULT_SAMPLE_ROWS, REPAIRS, SAME_ERROR, Reader, SampledErrors, SearchSettings, relative_total, search_order

#: (pattern searched in a tensor's name, the axis that carries the residual stream, or None for
#: a tensor of the model that does not carry it).  A tensor no pattern knows stops the run: an
#: unknown tensor might carry the hidden dimension, and permuting around it would change the model.
RESIDUAL_PATTERNS: tuple[tuple[str, int | None], ...] = (
    # Llama family, Hugging Face names
    (r"^(model\.)?embed_tokens\.weight$", 1),
    (r"\.self_attn\.(q|k|v)_proj\.weight$", 1),
    (r"\.self_attn\.(q|k|v)_proj\.bias$", None),
    (r"\.self_attn\.(q|k)_norm\.weight$", None),  # per-head norms (Qwen3)
    (r"\.self_attn\.o_proj\.(weight|bias)$", 0),
    (r"\.mlp\.(gate|up)_proj\.weight$", 1),
    (r"\.mlp\.(gate|up)_proj\.bias$", None),
    (r"\.mlp\.down_proj\.(weight|bias)$", 0),
    (r"\.(input_layernorm|post_attention_layernorm)\.weight$", 0),
    (r"^(model\.)?norm\.weight$", 0),
    (r"^lm_head\.weight$", 1),
    (r"\.rotary_emb\.inv_freq$", None),
    # llama.cpp names (a GGUF input), Llama and BERT
    (r"^(token_embd|position_embd|token_types)\.weight$", 1),
    (r"^token_embd_norm\.(weight|bias)$", 0),
    (r"^blk\.\d+\.attn_(q|k|v)\.weight$", 1),
    (r"^blk\.\d+\.attn_(q|k|v)\.bias$", None),
    (r"^blk\.\d+\.attn_(q|k)_norm\.weight$", None),
    (r"^blk\.\d+\.attn_output\.(weight|bias)$", 0),
    (r"^blk\.\d+\.ffn_(gate|up)\.weight$", 1),
    (r"^blk\.\d+\.ffn_(gate|up)\.bias$", None),
    (r"^blk\.\d+\.ffn_down\.(weight|bias)$", 0),
    (r"^blk\.\d+\.(attn_norm|ffn_norm|attn_output_norm|layer_output_norm)\.(weight|bias)$", 0),
    (r"^output_norm\.(weight|bias)$", 0),
    (r"^output\.weight$", 1),
    (r"^rope_freqs\.weight$", None),
    # BERT, Hugging Face names (with or without the "bert." prefix)
    (r"embeddings\.(word|position|token_type)_embeddings\.weight$", 1),
    (r"embeddings\.LayerNorm\.(weight|bias)$", 0),
    (r"embeddings\.position_ids$", None),
    (r"attention\.self\.(query|key|value)\.weight$", 1),
    (r"attention\.self\.(query|key|value)\.bias$", None),
    (r"attention\.output\.dense\.(weight|bias)$", 0),
    (r"attention\.output\.LayerNorm\.(weight|bias)$", 0),
    (r"intermediate\.dense\.weight$", 1),
    (r"intermediate\.dense\.bias$", None),
    (r"layer\.\d+\.output\.dense\.(weight|bias)$", 0),
    (r"layer\.\d+\.output\.LayerNorm\.(weight|bias)$", 0),
    (r"pooler\.dense\.weight$", 1),  # reads the last hidden state; its output is not the stream
    (r"pooler\.dense\.bias$", None),
)
_COMPILED = tuple((re.compile(pattern), axis) for pattern, axis in RESIDUAL_PATTERNS)


def residual_axis(name: str) -> int | None:
    """The axis of tensor ``name`` that carries the residual stream (None: it does not carry it).
    Raises ConfigError for a tensor residual_stream does not know."""
    for pattern, axis in _COMPILED:
        if pattern.search(name):
            return axis
    if "_exps." in name:
        raise ConfigError(f"strategy residual_stream: tensor {name!r} holds a mixture-of-experts model's experts, whose "
                          "hidden dimension it does not move: it refuses MoE models")
    raise ConfigError(
        f"strategy residual_stream: tensor {name!r} is not one it knows (Llama-family and BERT models); "
        "permuting the hidden dimension around an unknown tensor could change the model's function"
    )


@dataclass(frozen=True)
class ResidualChoice:
    """The chosen order of the hidden dimension and what it measured, per reader: its squared
    error under identity and under the chosen order (in its target type, weighted by its
    importance vector when the run has one)."""

    perm: np.ndarray | None  # None: identity won
    candidate: str
    identity_errors: dict[str, float] = field(default_factory=dict)
    chosen_errors: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # candidate -> why it lost

    def permutation(self, axis: int) -> Permutation | None:
        return None if self.perm is None else Permutation(self.perm, axis)

    def gain_db(self, name: str) -> float | None:
        """10 log10(identity's error / the chosen order's) for a reader."""
        before, after = self.identity_errors.get(name), self.chosen_errors.get(name)
        return None if before is None or after is None else gain_db(before, after)


def balanced_order(order: np.ndarray, block: int) -> np.ndarray:
    """``order`` (columns, most important first) dealt over blocks of ``block`` columns like cards,
    back and forth, so that each block gets a share of every magnitude."""
    width = order.size
    blocks = max(1, width // block)
    if width % block or blocks == 1:
        return order
    rank = np.arange(width)
    lap, seat = rank // blocks, rank % blocks
    target = np.where(lap % 2 == 0, seat, blocks - 1 - seat)  # serpentine
    return np.concatenate([order[target == b] for b in range(blocks)])


def gathered_order(scores: np.ndarray, count: int, block: int) -> np.ndarray:
    """Identity, except that the ``count`` highest-scoring columns (at most a block's worth) move
    into the block of ``block`` columns that holds the highest, each in place of one of its
    lowest-scoring other columns: outliers shared by the readers then widen one block's scale
    instead of several, and every other column stays where it was."""
    width = scores.size
    order = np.arange(width)
    ranked = descending_order(scores)
    count = min(count, block, width)
    top = ranked[:count]
    target = np.arange(ranked[0] // block * block, min(width, ranked[0] // block * block + block))
    leading = np.zeros(width, dtype=bool)
    leading[top] = True
    outside = top[(top < target[0]) | (top > target[-1])]
    ordinary = target[~leading[target]]
    vacate = ordinary[np.argsort(scores[ordinary], kind="stable")][: outside.size]
    order[vacate], order[outside] = outside, vacate
    return order


#: swaps the search tries unless the config says otherwise: on the models of docs/permutations.md the
#: gain levels off well before this, and the search costs less than judging one order on every row
DEFAULT_BUDGET = 200
#: orders judged on every row of every reader (the rest only on the sample): each costs a quantization of them all
_JUDGED = 3
#: searches at most per kind of repair, each after the last one's result proved worse on all rows for some reader
_SEARCHES = 3


class ResidualStreamStrategy(QuantizationStrategy):
    """Permute the hidden dimension of the whole model (see the module's docstring).

    It claims no group: its permutation is one for the model, decided before the groups are
    quantized, and it composes with mlp_joint and head_order, which permute the other axis of
    the same tensors.
    """

    name = "residual_stream"
    permutation_kind = "joint"
    per_tensor = False
    model_level = True

    def __init__(self, match: str | None = None, budget: int = DEFAULT_BUDGET, seed: int = 0, sample_rows: int = DEFAULT_SAMPLE_ROWS) -> None:
        if match is not None:
            raise ConfigError("strategy residual_stream: takes no match: it permutes every tensor that carries the hidden dimension")
        super().__init__(None)
        self.search = SearchSettings.checked(self.name, budget, seed, sample_rows)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), **self.search.describe()}

    def claim(self, candidates: Mapping[str, Candidate], model_config: Mapping[str, object]) -> list[tuple[str, ...]]:
        return []

    def permutations(self, tensors: Mapping[str, np.ndarray], error: SquaredError) -> dict[str, Permutation | None]:
        raise TypeError("residual_stream permutes the whole model: see choose()")

    def axes(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
        """The residual axis of every tensor that carries the stream; checks that they agree on
        one width."""
        axes = {name: axis for name in sorted(shapes) if (axis := residual_axis(name)) is not None}
        widths = {shapes[name][axis] for name, axis in axes.items() if axis < len(shapes[name])}
        if not axes or len(widths) != 1 or any(axis >= len(shapes[name]) for name, axis in axes.items()):
            detail = ", ".join(f"{n} {shapes[n]}" for n in list(axes)[:6])
            raise ConfigError(f"strategy residual_stream: the model's residual stream has no single width ({detail})")
        return axes

    def choose(self, readers: Mapping[str, Reader], error: SquaredError, block: int, scale_group: int) -> ResidualChoice:
        """The order of the hidden dimension for ``readers`` (their columns are the stream):
        among identity, descending column energy (each reader's share, summed),
        importance-weighted energy (with an imatrix), the energy order dealt over blocks of
        ``block`` columns and the highest-energy columns gathered into one block, screened on a
        seeded sample of rows; with a budget, the local search (search.py) from the one of most
        gain, swapping columns between groups of ``scale_group`` columns that share a scale.  The
        search's order and the best screened ones that no sampled reader finds worse are judged on
        every row (``error`` measures a reader on all its rows): the least error relative to
        identity summed over the readers, among the orders that leave no reader worse than
        identity, wins; identity if none does."""
        if not readers:
            return ResidualChoice(None, "identity")
        width = next(iter(readers.values())).array.shape[1]
        energy = np.zeros(width)
        weighted = np.zeros(width)
        for name, reader in sorted(readers.items()):
            norms = np.zeros(width, dtype=np.float64)
            column_sq_norms(reader.array, norms)
            energy += norms / max(norms.sum(), np.finfo(np.float64).tiny)
            if reader.importance is not None:
                scaled = norms * reader.importance
                weighted += scaled / max(scaled.sum(), np.finfo(np.float64).tiny)
        by_energy = descending_order(energy)
        candidates: dict[str, np.ndarray] = {"energy": by_energy, "balanced": balanced_order(by_energy, block)}
        for count in sorted({max(1, block // 8), max(1, block // 4), max(1, block // 2), block}):
            candidates[f"gathered {count}"] = gathered_order(energy, count, block)
        if weighted.any():
            candidates["importance"] = descending_order(weighted)
        rejected: dict[str, str] = {}
        identity_order = np.arange(width)
        # every order is screened on the same seeded sample of rows; only finalists are judged on all
        sampled = SampledErrors(readers, self.search.sample_rows, np.random.default_rng(self.search.seed))
        sample_identity = sampled.reset(identity_order)
        screened: list[tuple[float, str]] = []  # (score on the sample, label) of orders no sampled reader finds worse
        start, start_score = None, float(len(readers))  # the most gain on the sample, worse for some reader or not
        for label, order in candidates.items():
            if np.array_equal(order, identity_order):
                rejected[label] = "is the identity"
                continue
            errors = sampled.reset(order)
            score = relative_total(errors, sample_identity)
            if score < start_score:
                start, start_score = label, score
            worse = sorted(n for n in readers if errors[n] > sample_identity[n])
            if worse:
                rejected[label] = f"worse than identity for {len(worse)} of {len(readers)} tensors (first: {worse[0]})"
            elif score < len(readers):
                screened.append((score, label))
            else:
                rejected[label] = "no gain"
        finalists = [label for _, label in sorted(screened)]
        identity = {name: error(name, reader.array, None) for name, reader in readers.items()}
        judged: dict[str, dict[str, float]] = {}

        def judge(label: str) -> list[str]:
            """Measure an order on every row; the readers it leaves worse than identity."""
            judged[label] = {name: error(name, reader.array, candidates[label]) for name, reader in readers.items()}
            worse = sorted(n for n in readers if judged[label][n] > identity[n])
            if worse:
                rejected[label] = f"worse than identity on all rows for {len(worse)} of {len(readers)} tensors (first: {worse[0]})"
            return worse

        if self.search.budget:
            origin = start or "identity"
            whole: frozenset[str] = frozenset()
            sampled_whole = whole  # the readers ``sampled`` holds on all rows
            # neighbouring-block repairs first; if they leave some reader worse on all rows after
            # every search, the ordinary moves from the start again (each suits other models)
            for repair in REPAIRS:
                order, swaps = candidates[start] if start else identity_order, 0
                found = False
                for attempt in range(_SEARCHES):
                    # a reader a sample misled is measured on all its rows in every later search,
                    # which goes on from the order the last one reached
                    if whole != sampled_whole:
                        sampled = SampledErrors(readers, self.search.sample_rows, np.random.default_rng(self.search.seed), whole)
                        sampled_whole = whole
                    order, kept = search_order(readers, order, energy, scale_group, self.search, sampled, repair)
                    swaps += len(kept)
                    label = (f"search from {origin}{'' if repair == REPAIRS[0] else ', ' + repair + ' repairs'}"
                             f" ({swaps} of {(attempt + 1) * self.search.budget} swaps kept"
                             + (f", {len(whole)} tensors on all rows)" if whole else ")"))
                    if not kept:
                        rejected[label] = "no swap lowered the error"
                        break
                    candidates[label] = order
                    worse = judge(label)
                    if not worse:
                        finalists.insert(0, label)
                        found = True
                        break
                    whole |= set(worse)
                if found:
                    break
        best, best_score, best_errors = None, len(readers) * (1 - SAME_ERROR), identity  # a gain beyond float rounding
        for label in finalists[:_JUDGED]:
            if label not in judged and judge(label):
                continue
            if label in rejected:
                continue
            score = relative_total(judged[label], identity)
            if score < best_score:
                if best is not None:
                    rejected[best] = "less gain on all rows"
                best, best_score, best_errors = label, score, judged[label]
            else:
                rejected[label] = "less gain on all rows"
        for label in finalists[_JUDGED:]:
            rejected[label] = "less gain on the sample"
        if best is None:
            return ResidualChoice(None, "identity", identity, identity, rejected)
        return ResidualChoice(candidates[best], best, identity, best_errors, rejected)

