"""Function-preserving joint permutations: no gather at run time, no ``.perm`` file.

Permuting a hidden dimension consistently on both sides leaves the model's function
unchanged: the rows of the tensors that produce it and the columns of the tensor that
consumes it move together.  Only the consumer's blocks change (a row permutation moves
whole rows, and blocks never cross rows), so the order is chosen to minimise the
consumer's actual error in its type among a few candidate orders, identity included, then
(with a ``budget``) improved by the local search of search.py, over columns (mlp_joint) or whole
heads and the value channels inside them (head_order): a joint permutation never makes the model's
quantization worse than none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from qstrat.errors import ConfigError
from qstrat.formats import block_type
from qstrat.kernels import column_abs_max, column_sq_norms
from qstrat.strategies.base import (
    Candidate,
    Permutation,
    QuantizationStrategy,
    SquaredError,
    compile_patterns,
    descending_order,
    gain_db,
)
from qstrat.strategies.residual import balanced_order
from qstrat.strategies.search import (
    DEFAULT_SAMPLE_ROWS,
    SAME_ERROR,
    SearchSettings,
    channels_matter,
    check_integer_option,
    expand_heads,
    scale_group,
    search_head_order,
    search_order,
    search_value_channels,
    split_heads,
)


def best_order(
    name: str,
    consumer: np.ndarray,
    candidates: Sequence[np.ndarray | None],
    error: SquaredError,
    improve: Callable[[np.ndarray], np.ndarray | None] | None = None,
) -> tuple[np.ndarray | None, float]:
    """The candidate column order with the least actual quantization error of ``consumer`` (first
    on ties; ``candidates[0]`` is None, the identity), then the order ``improve`` finds from it
    (a local search of search.py, judged on samples) if its error over all rows is lower; and
    the gain in dB of the order chosen over identity.  An order must be better by more than
    float rounding (``SAME_ERROR``) to be chosen over one before it."""
    errors = [error(name, consumer, order) for order in candidates]
    best = 0
    for i, candidate_error in enumerate(errors):
        if candidate_error < errors[best] * (1 - SAME_ERROR):
            best = i
    order, best_error = candidates[best], errors[best]
    if improve is not None:
        found = improve(np.arange(consumer.shape[1]) if order is None else order)
        if found is not None:
            found_error = error(name, consumer, found)
            if found_error < best_error * (1 - SAME_ERROR):
                order, best_error = found, found_error
    return order, gain_db(errors[0], best_error)


class _SearchedWithBudget(QuantizationStrategy):
    """A joint strategy whose local search (``self.search``) runs only when given a budget."""

    search: SearchSettings

    def describe(self) -> dict[str, object]:
        # recorded only with a search, so that earlier runs' records (and fingerprints) stay as they were
        return {**super().describe(), **(self.search.describe() if self.search.budget else {})}


# -- mlp_joint ---------------------------------------------------------------------------------

#: (block, role, param) patterns; roles: producers of the intermediate dimension, and its consumer
MLP_PATTERNS: tuple[str, ...] = (
    r"^(?P<block>.+\.mlp)\.(?P<role>gate_proj|up_proj|down_proj)\.(?P<param>weight|bias)$",  # Llama, Mistral, Qwen
    r"^(?P<block>.+\.layer\.\d+)\.(?P<role>intermediate)\.dense\.(?P<param>weight|bias)$",  # BERT
    r"^(?P<block>.+\.layer\.\d+)\.(?P<role>output)\.dense\.(?P<param>weight)$",  # BERT (bias is hidden-sized)
    r"^(?P<block>.+\.mlp)\.(?P<role>fc1|fc2|dense_h_to_4h|dense_4h_to_h)\.(?P<param>weight|bias)$",  # Phi, NeoX
    r"^(?P<block>blk\.\d+)\.(?P<role>ffn_gate|ffn_up|ffn_down)\.(?P<param>weight|bias)$",  # llama.cpp (a GGUF input)
)
_PRODUCERS = {"gate_proj", "up_proj", "intermediate", "fc1", "dense_h_to_4h", "ffn_gate", "ffn_up"}
_CONSUMERS = {"down_proj", "output", "fc2", "dense_4h_to_h", "ffn_down"}


class MlpJointStrategy(_SearchedWithBudget):
    """Permute an MLP's intermediate dimension: rows of gate/up (and biases), columns of down."""

    name = "mlp_joint"
    permutation_kind = "joint"
    per_tensor = False

    def __init__(
        self,
        match: str | None = None,
        patterns: Sequence[str] | None = None,
        budget: int = 0,
        seed: int = 0,
        sample_rows: int = DEFAULT_SAMPLE_ROWS,
    ) -> None:
        super().__init__(match)
        self.pattern_sources = tuple(patterns) if patterns else MLP_PATTERNS
        self.patterns = compile_patterns(self.pattern_sources, "strategy mlp_joint: patterns", {"block", "role", "param"})
        self.search = SearchSettings.checked(self.name, budget, seed, sample_rows)

    def _recognise(self, name: str):
        for pattern in self.patterns:
            found = pattern.match(name)
            if found and found.group("role") in _PRODUCERS | _CONSUMERS:
                return found.group("block"), found.group("role"), found.group("param")
        return None

    def _examine(self, candidates: Mapping[str, Candidate]) -> list[tuple[str, tuple[str, ...], str | None]]:
        """Each MLP the patterns recognise: its block, its members, and why it cannot be permuted
        (None: it can; "": nothing to say, its consumer not being quantized or no producer recognised,
        as in Phi-3's fused gate_up_proj)."""
        blocks: dict[str, list[tuple[str, str, str]]] = {}
        for name in sorted(candidates):
            recognised = self._recognise(name) if self.matches(name) else None
            if recognised:
                block, role, param = recognised
                if role in _CONSUMERS and param != "weight":
                    continue  # the consumer's bias lives in the outer dimension
                blocks.setdefault(block, []).append((name, role, param))
        examined = []
        for block, members in sorted(blocks.items()):
            consumers = [n for n, role, p in members if role in _CONSUMERS]
            producers = [n for n, role, p in members if role in _PRODUCERS and p == "weight"]
            why = None
            if not producers:
                why = ""
            elif len(consumers) != 1:
                found = ", ".join(n for n, _, _ in members)
                why = f"it needs one down projection (the consumer of gate and up); found {found}"
            elif not candidates[consumers[0]].quantizable:
                why = ""
            else:
                width = candidates[consumers[0]].shape[1]
                other = next((n for n, role, p in members if role in _PRODUCERS and (len(candidates[n].shape) < 1 or candidates[n].shape[0] != width)), None)
                if other is not None:
                    why = (f"{consumers[0]} reads {width} columns, but {other} has shape {list(candidates[other].shape)}, "
                           f"not {width} rows")
            examined.append((block, tuple(sorted(n for n, _, _ in members)), why))
        return examined

    def claim(self, candidates: Mapping[str, Candidate], model_config: Mapping[str, object]) -> list[tuple[str, ...]]:
        return sorted(members for _, members, why in self._examine(candidates) if why is None)

    def passed_over(self, candidates: Mapping[str, Candidate], model_config: Mapping[str, object]) -> list[str]:
        left = [(block, why) for block, _, why in self._examine(candidates) if why]
        if not left:
            return []
        named = "; ".join(f"{block}: {why}" for block, why in left[:3]) + ("; ..." if len(left) > 3 else "")
        return [f"{len(left)} MLP(s) left unpermuted: {named}"]

    def group_id(self, members: Sequence[str]) -> str:
        return self._recognise(members[0])[0]

    def permutations(self, tensors: Mapping[str, np.ndarray], error: SquaredError) -> dict[str, Permutation | None]:
        roles = {name: self._recognise(name)[1] for name in tensors}
        consumer_name = next(n for n, role in roles.items() if role in _CONSUMERS)
        consumer = tensors[consumer_name]
        norms = np.zeros(consumer.shape[1], dtype=np.float64)
        column_sq_norms(consumer, norms)
        amax = np.zeros(consumer.shape[1], dtype=np.float32)
        column_abs_max(consumer, amax)
        candidates = [None, descending_order(norms), descending_order(amax)]
        reader = error.reader(consumer_name, consumer) if hasattr(error, "reader") else None
        if reader is not None:
            candidates.append(balanced_order(descending_order(norms), block_type(reader.type_name).block_size))
            if reader.importance is not None:
                candidates.append(descending_order(norms * reader.importance))
        improve = None
        if reader is not None and self.search.budget:
            def improve(start: np.ndarray) -> np.ndarray | None:
                # one reader: no other matrix whose blocks a neighbouring-block repair would re-deal
                # (a fourth of the moves so cost MiniLM's down projections 0.14 dB at Q8_K)
                found, kept = search_order({consumer_name: reader}, start, norms, scale_group([reader.type_name]), self.search, repair="mixed")
                return found if kept else None
        order, gain = best_order(consumer_name, consumer, candidates, error, improve)
        if order is None:
            return {name: None for name in tensors}
        return {name: Permutation(order, 1, gain) if name == consumer_name else Permutation(order, 0) for name in tensors}


# -- head_order --------------------------------------------------------------------------------

HEAD_PATTERNS: tuple[str, ...] = (
    r"^(?P<block>.+\.self_attn)\.(?P<role>q|k|v)_proj\.(?P<param>weight|bias)$",  # Llama, Mistral, Qwen
    r"^(?P<block>.+\.self_attn)\.(?P<role>o)_proj\.(?P<param>weight)$",
    r"^(?P<block>.+\.attention)\.self\.(?P<role>query|key|value)\.(?P<param>weight|bias)$",  # BERT
    r"^(?P<block>.+\.attention)\.(?P<role>output)\.dense\.(?P<param>weight)$",
    # llama.cpp (a GGUF input): its q/k rows are reordered within each head only, so heads stay whole
    r"^(?P<block>blk\.\d+)\.(?P<role>attn_q|attn_k|attn_v)\.(?P<param>weight|bias)$",
    r"^(?P<block>blk\.\d+)\.(?P<role>attn_output)\.(?P<param>weight)$",
)
_ROLE = {"q": "q", "query": "q", "k": "k", "key": "k", "v": "v", "value": "v", "o": "o", "output": "o",
         "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o"}


class HeadOrderStrategy(_SearchedWithBudget):
    """Reorder attention heads, and the value channels inside them: rows of q/k/v (and biases)
    by head, columns of o by head and channel.

    Under grouped-query attention a key/value head moves with the query heads that read it
    (groups are reordered, and query heads within a group).  q and k stay whole inside a head
    (RoPE pairs their dimensions there), but v's are free: channel c of a value head feeds
    column c of every query head of its group in o, so one channel order per group moves v's
    rows and those columns of o together.  That is what changes o's blocks when a head spans
    whole blocks (Q8_0's 32 columns inside a head of 64 or 128).
    Head geometry comes from the options or from the model's config.json.
    """

    name = "head_order"
    permutation_kind = "joint"
    per_tensor = False

    def __init__(
        self,
        match: str | None = None,
        patterns: Sequence[str] | None = None,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        budget: int = 0,
        seed: int = 0,
        sample_rows: int = DEFAULT_SAMPLE_ROWS,
    ) -> None:
        super().__init__(match)
        self.pattern_sources = tuple(patterns) if patterns else HEAD_PATTERNS
        self.patterns = compile_patterns(self.pattern_sources, "strategy head_order: patterns", {"block", "role", "param"})
        for key, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if value is not None:
                check_integer_option(self.name, key, value, 1)
        self.geometry_options = (num_heads, num_kv_heads, head_dim)
        self.geometry: tuple[int, int, int] | None = None
        self.search = SearchSettings.checked(self.name, budget, seed, sample_rows)

    def _recognise(self, name: str):
        for pattern in self.patterns:
            found = pattern.match(name)
            if found and found.group("role") in _ROLE:
                return found.group("block"), _ROLE[found.group("role")], found.group("param")
        return None

    def _resolve_geometry(self, model_config: Mapping[str, object], hidden: int) -> tuple[int, int, int]:
        heads, kv_heads, head_dim = self.geometry_options
        heads = heads or model_config.get("num_attention_heads") or model_config.get("n_head")
        if not isinstance(heads, int) or heads < 1:
            raise ConfigError(
                "strategy head_order: the number of attention heads is unknown; put the model's config.json "
                "beside its weights or set the strategy's num_heads option"
            )
        kv_heads = kv_heads or model_config.get("num_key_value_heads") or heads
        head_dim = head_dim or model_config.get("head_dim") or hidden // heads
        if not all(isinstance(v, int) and v > 0 for v in (kv_heads, head_dim)) or heads % kv_heads:
            options = self.geometry_options
            origin = ("the strategy's options" if options[0] and options[1]
                      else "the strategy's options and the model's config.json" if options[0] or options[1]
                      else "the model's config.json (num_attention_heads, num_key_value_heads)")
            raise ConfigError(f"strategy head_order: {heads} heads cannot share {kv_heads} key/value heads (from {origin}); "
                              "set the strategy's num_heads and num_kv_heads options to the model's")
        return heads, kv_heads, head_dim

    def claim(self, candidates: Mapping[str, Candidate], model_config: Mapping[str, object]) -> list[tuple[str, ...]]:
        blocks: dict[str, dict[tuple[str, str], str]] = {}
        for name in sorted(candidates):
            recognised = self._recognise(name) if self.matches(name) else None
            if recognised:
                block, role, param = recognised
                blocks.setdefault(block, {})[(role, param)] = name
        groups = []
        for members in blocks.values():
            if not {("q", "weight"), ("k", "weight"), ("v", "weight"), ("o", "weight")} <= set(members):
                continue
            o_name = members[("o", "weight")]
            if not candidates[o_name].quantizable:
                continue  # head order only changes the output projection's blocks
            geometry = self._resolve_geometry(model_config, candidates[members[("q", "weight")]].shape[-1])
            if self.geometry not in (None, geometry):
                raise ConfigError("strategy head_order: layers of different head geometry are not supported")
            self.geometry = geometry
            heads, kv_heads, head_dim = geometry
            expected = {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim}
            for (role, _), name in members.items():
                size = candidates[name].shape[1] if role == "o" else candidates[name].shape[0]
                if size != expected.get(role, heads * head_dim):
                    raise ConfigError(
                        f"strategy head_order: tensor {name!r} has shape {candidates[name].shape}, which does not "
                        f"fit {heads} heads / {kv_heads} key-value heads of size {head_dim}"
                    )
            groups.append(tuple(sorted(members.values())))
        return sorted(groups)

    def group_id(self, members: Sequence[str]) -> str:
        return self._recognise(members[0])[0]

    def _head_order(self, scores: np.ndarray) -> np.ndarray:
        """Query heads in the new order: groups by descending total score, heads within by score."""
        heads, kv_heads, _ = self.geometry
        per_group = heads // kv_heads
        grouped = scores.reshape(kv_heads, per_group)
        order = []
        for group in descending_order(grouped.sum(axis=1)):
            order.extend(group * per_group + descending_order(grouped[group]))
        return np.asarray(order, dtype=np.int64)

    def permutations(self, tensors: Mapping[str, np.ndarray], error: SquaredError) -> dict[str, Permutation | None]:
        heads, kv_heads, head_dim = self.geometry
        per_group = heads // kv_heads
        roles = {name: self._recognise(name)[1] for name in tensors}
        o_name = next(n for n, role in roles.items() if role == "o")
        o = tensors[o_name]
        norms = np.zeros(o.shape[1], dtype=np.float64)
        column_sq_norms(o, norms)
        amax = np.zeros(o.shape[1], dtype=np.float32)
        column_abs_max(o, amax)
        reader = error.reader(o_name, o) if hasattr(error, "reader") else None
        energies = [norms] if reader is None or reader.importance is None else [norms, norms * reader.importance]
        head_orders = [np.arange(heads), self._head_order(norms.reshape(heads, head_dim).sum(axis=1)),
                       self._head_order(amax.reshape(heads, head_dim).max(axis=1).astype(np.float64))]
        head_orders += [self._head_order(e.reshape(heads, head_dim).sum(axis=1)) for e in energies[1:]]
        # a value channel feeds the same column of o in every query head of its group: by their summed energy
        channel_energies = [e.reshape(kv_heads, per_group, head_dim).sum(axis=1) for e in energies]
        channel_orders = [None]
        if reader is None or channels_matter(heads, head_dim, reader.type_name):
            channel_orders += [np.stack([descending_order(row) for row in energy]) for energy in channel_energies]
        improve = None
        if reader is not None and self.search.budget:
            def improve(start: np.ndarray) -> np.ndarray | None:
                start_heads, channels = split_heads(start, head_dim, per_group)
                found, kept_heads = search_head_order(reader, start_heads, kv_heads, head_dim, self.search, channels)
                channels, kept_channels = search_value_channels(reader, found, channels, head_dim, channel_energies[-1], self.search)
                return expand_heads(found, head_dim, channels, per_group) if kept_heads or kept_channels else None
        candidates = [None] + [expand_heads(order, head_dim, channels, per_group)
                               for order in head_orders for channels in channel_orders][1:]
        chosen, gain = best_order(o_name, o, candidates, error, improve)
        if chosen is None:
            return {name: None for name in tensors}
        query_heads, channels = split_heads(chosen, head_dim, per_group)
        kv_heads_order = query_heads[::per_group] // per_group
        # q and k move by whole heads (RoPE pairs dimensions inside a head); v's channels move too
        orders = {"q": expand_heads(query_heads, head_dim), "k": expand_heads(kv_heads_order, head_dim),
                  "v": expand_heads(kv_heads_order, head_dim, channels)}
        return {name: Permutation(chosen, 1, gain) if role == "o" else Permutation(orders[role], 0) for name, role in roles.items()}
