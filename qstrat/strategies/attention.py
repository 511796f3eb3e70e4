"""attention_aware: one shared input permutation for the q, k and v projections of a layer.

q, k and v read the same input, so a single gather of the activation serves all three;
the permutation comes from their combined column norms (the norm of the stacked rows), so
it is independent of which tensor is seen first.  Output projections are claimed and left
unpermuted, as the original tool did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from qstrat.kernels import column_sq_norms
from qstrat.strategies.base import (
    Candidate,
    Permutation,
    QuantizationStrategy,
    SquaredError,
    common_width,
    compile_patterns,
    descending_order,
)

#: Each pattern names the attention block (``block``) and the projection's ``role``:
#: q/k/v share a permutation, qkv (fused) gets its own, o stays unpermuted.
DEFAULT_PATTERNS: tuple[str, ...] = (
    # HF Llama / Mistral / Qwen / Gemma
    r"^(?P<block>.+\.self_attn)\.(?P<role>q|k|v|o)_proj\.weight$",
    # BERT / RoBERTa
    r"^(?P<block>.+\.attention)\.self\.(?P<role>query|key|value)\.weight$",
    r"^(?P<block>.+\.attention)\.(?P<role>output)\.dense\.weight$",
    # GPT-NeoX / Phi / Falcon fused projections
    r"^(?P<block>.+)\.(?P<role>qkv_proj|query_key_value|Wqkv)\.weight$",
    r"^(?P<block>.+\.(?:attention|self_attn|mixer))\.(?P<role>dense|out_proj)\.weight$",
)
_SHARED_ROLES = {"q": "q", "k": "k", "v": "v", "query": "q", "key": "k", "value": "v"}
_OUTPUT_ROLES = {"o", "output", "dense", "out_proj"}


class AttentionAwareStrategy(QuantizationStrategy):
    name = "attention_aware"
    permutation_kind = "runtime"
    per_tensor = False
    needs_finite_values = False  # column norms, as l2_norm

    def __init__(self, match: str | None = None, patterns: Sequence[str] | None = None) -> None:
        super().__init__(match)
        self.pattern_sources = tuple(patterns) if patterns else DEFAULT_PATTERNS
        self.patterns = compile_patterns(self.pattern_sources, "strategy attention_aware: patterns", {"block", "role"})

    def _recognise(self, name: str) -> tuple[str, str] | None:
        for pattern in self.patterns:
            found = pattern.match(name)
            if found:
                return found.group("block"), found.group("role")
        return None

    def claim(
        self, candidates: Mapping[str, Candidate], model_config: Mapping[str, object]
    ) -> list[tuple[str, ...]]:
        shared: dict[tuple[str, int], list[str]] = {}
        groups: list[tuple[str, ...]] = []
        for name in sorted(candidates):
            if not candidates[name].quantizable or not self.matches(name):
                continue
            recognised = self._recognise(name)
            if recognised is None:
                continue
            block, role = recognised
            if role in _SHARED_ROLES:
                # only projections of equal input width can share a gather
                shared.setdefault((block, candidates[name].shape[-1]), []).append(name)
            else:
                groups.append((name,))
        groups.extend(tuple(members) for members in shared.values())
        return sorted(groups)

    def permutations(self, tensors: Mapping[str, np.ndarray], error: SquaredError) -> dict[str, Permutation | None]:
        names = sorted(tensors)
        if self.planned_permutation(names) == "none":
            return {names[0]: None}
        norms = np.zeros(common_width(tensors, self.name), dtype=np.float64)
        for name in names:  # sorted: the float64 sum is the same whatever the offer order
            column_sq_norms(tensors[name], norms)
        shared = Permutation(descending_order(norms), 1)
        return {name: shared for name in names}

    def planned_permutation(self, members: Sequence[str]) -> str:
        return "none" if len(members) == 1 and self._role(members[0]) in _OUTPUT_ROLES else self.permutation_kind

    def _role(self, name: str) -> str | None:
        recognised = self._recognise(name)
        return recognised[1] if recognised else None

    def describe(self) -> dict[str, object]:
        spec = super().describe()
        if self.pattern_sources != DEFAULT_PATTERNS:
            spec["patterns"] = list(self.pattern_sources)
        return spec
