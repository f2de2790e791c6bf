"""Weighted mixtures and the eval split, deterministic by data.split_seed.

Each source is split first (eval_fraction of its records held out, by the seed), so an eval example is never
also a training example even when a small source is repeated. The training mixture then holds as many
examples as all sources' training parts together; source i contributes weight_i / sum(weights) of them:
sampled without replacement where it has more, repeated (whole copies, then a seeded sample) where it has
fewer. A single source is used exactly once, in full. The eval set is every source's held-out part, unweighted.

planned_counts is plain Python (the plan shows it); the index functions take numpy (run time only).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple


def split_sizes(n: int, eval_fraction: float) -> Tuple[int, int]:
    n_eval = int(round(n * eval_fraction))
    return n - n_eval, n_eval


def train_counts(train_sizes: Sequence[int], weights: Sequence[float]) -> List[int]:
    """How many training examples each source contributes (largest remainder, so they add up exactly)."""
    total = sum(train_sizes)
    weight_sum = float(sum(weights))
    if len(train_sizes) == 1:
        return [total]
    shares = [total * w / weight_sum for w in weights]
    counts = [int(s) for s in shares]
    order = sorted(range(len(shares)), key=lambda i: (counts[i] - shares[i], i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def planned_counts(used: Sequence[Optional[int]], weights: Sequence[float],
                   eval_fraction: float) -> Optional[List[Tuple[int, int]]]:
    """(train, eval) examples per source before tokenization, or None where a source's size is unknown."""
    if any(n is None for n in used) or not used or sum(weights) <= 0:
        return None
    splits = [split_sizes(int(n), eval_fraction) for n in used]  # type: ignore[arg-type]
    counts = train_counts([s[0] for s in splits], weights)
    return [(c, s[1]) for c, s in zip(counts, splits)]


def split_indices(n: int, eval_fraction: float, rng: Any) -> Tuple[Any, Any]:
    """(train rows, eval rows) of one source: a seeded permutation, eval first."""
    import numpy as np

    _, n_eval = split_sizes(n, eval_fraction)
    order = rng.permutation(n).astype(np.int64)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def sample(rows: Any, count: int, rng: Any) -> Any:
    """`count` of `rows`: a seeded subset without replacement, or whole copies plus a seeded remainder."""
    import numpy as np

    n = len(rows)
    if count == n:
        return rows
    if n == 0:
        return rows[:0]
    copies, rest = divmod(count, n)
    extra = np.sort(rng.choice(n, size=rest, replace=False)) if rest else np.zeros(0, dtype=np.int64)
    return np.concatenate([np.tile(rows, copies), rows[extra]])
