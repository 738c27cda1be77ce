"""Confidence intervals for every per-point statistic: over requests, and over seeds where a point has several.

One run (one seed) — intervals over its requests, 95% by default:
  - percentiles (P50/P90/P99 of TTFT, TPOT, E2E): the distribution-free order-statistic interval (the ranks a
    binomial(n, q) count puts around the q-quantile); where the sample is too small to bound it (P99 of fewer
    than ~300 requests), the upper end is +inf rather than a number that only looks like a bound;
  - ITL percentiles: a bootstrap that resamples whole requests (a request's gaps are not independent);
  - SLO attainment: the Wilson score interval (never [1, 1] at 100%: sixty passing requests bound it at ~94%);
  - means: a percentile bootstrap over requests;
  - throughput: completions in a window as a Poisson count (Garwood's exact interval), times the bootstrapped
    mean output length for token throughput.
Several seeds of one point — a two-level bootstrap (seeds with replacement, then requests within each), pooled
statistic per replicate, never narrower than the pooled one-level interval above.

Every interval assumes the requests of a run are independent draws. Latencies under load are correlated in
time (a burst delays its neighbours), so one run's intervals are optimistic; seeds, being independent runs,
are what carries that variance into the interval: sweep `workload.seed` for claims that matter.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP = 1000
PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft_s", "tpot_s", "e2e_s")


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _finite(values) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return v[~np.isnan(v)]


def wilson(k: int, n: int, conf: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    if n <= 0:
        return math.nan, math.nan
    z = stats.norm.ppf(0.5 + conf / 2)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if k == 0 else max(0.0, float(mid - half))
    hi = 1.0 if k == n else min(1.0, float(mid + half))
    return lo, hi


def quantile_ci(values, q: float, conf: float = CONFIDENCE) -> tuple[float, float]:
    """Distribution-free interval of the q-quantile (0 < q < 1): order statistics at binomial ranks.

    The lower end is the largest order statistic below which at most (1-conf)/2 of the binomial(n, q)
    mass lies, the upper end symmetric; an end the sample cannot reach is -inf / +inf.
    """
    v = np.sort(_finite(values))
    n = v.size
    if n == 0:
        return math.nan, math.nan
    alpha = (1 - conf) / 2
    # rank r (1-based) with P(Binom(n, q) < r) <= alpha: X_(r) <= quantile with probability >= 1 - alpha
    lo_rank = int(stats.binom.ppf(alpha, n, q))  # P(B <= lo_rank) >= alpha
    if stats.binom.cdf(lo_rank, n, q) > alpha:
        lo_rank -= 1
    hi_rank = int(stats.binom.ppf(1 - alpha, n, q)) + 1
    lo = v[lo_rank - 1] if lo_rank >= 1 else -math.inf
    hi = v[hi_rank - 1] if hi_rank <= n else math.inf
    return float(lo), float(hi)


def garwood(count: int, conf: float = CONFIDENCE) -> tuple[float, float]:
    """Exact Poisson interval of a count."""
    alpha = 1 - conf
    lo = 0.0 if count == 0 else stats.chi2.ppf(alpha / 2, 2 * count) / 2
    hi = stats.chi2.ppf(1 - alpha / 2, 2 * count + 2) / 2
    return float(lo), float(hi)


_LAST_DRAWS: dict[tuple[int, int, int], np.ndarray] = {}
_MEAN_CIS: dict[tuple, tuple[float, float]] = {}  # bootstrap_ci of np.mean, by its values' bytes and settings


def bootstrap_ci(values, stat=np.mean, n_boot: int = BOOTSTRAP, conf: float = CONFIDENCE,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of `stat` over the values (vectorised: `stat(matrix, axis=1)`).

    The mean's interval is remembered by its values: runs that share one simulation and differ in their SLOs
    (a sweep's tight and loose halves) have the same latencies, and a 4000-value bootstrap costs ~15 ms."""
    v = _finite(values)
    if v.size == 0:
        return math.nan, math.nan
    if v.size == 1:
        return float(v[0]), float(v[0])
    key = (hashlib.blake2b(v.tobytes(), digest_size=16).digest(), v.size, n_boot, conf, seed) \
        if stat is np.mean else None
    if key is not None and key in _MEAN_CIS:
        return _MEAN_CIS[key]
    idx = _draws(v.size, n_boot, seed)
    out = _pct_interval(np.concatenate([stat(v[b], axis=1) for b in _blocks(idx)]), conf)
    if key is not None:
        if len(_MEAN_CIS) >= 4096:
            _MEAN_CIS.clear()
        _MEAN_CIS[key] = out
    return out


def _blocks(idx: np.ndarray, size: int = 100):
    """The replicates' index rows a block at a time: the same numbers (each replicate is its own row's reduction)
    with the gathered values kept in cache, ~3x faster than gathering all 4M at once."""
    return (idx[i:i + size] for i in range(0, len(idx), size))


def _draws(n: int, n_boot: int, seed: int) -> np.ndarray:
    """The bootstrap's resampling indices, (n_boot, n), the last few kept: a run's latencies (TTFT, E2E, often
    TPOT) have the same count and seed, hence the same draws, and drawing 4M indices costs more than using them
    (a run's TPOT and ITL counts may differ from its TTFT's: three sets, asked for in turn, all stay)."""
    key = (n, n_boot, seed)
    idx = _LAST_DRAWS.pop(key, None)
    if idx is None:
        idx = _rng(seed).integers(0, n, (n_boot, n))
        while len(_LAST_DRAWS) >= 3:
            _LAST_DRAWS.pop(next(iter(_LAST_DRAWS)))
    _LAST_DRAWS[key] = idx  # the most recent last
    return idx


def _pct_interval(reps, conf: float) -> tuple[float, float]:
    reps = _finite(reps)
    if reps.size == 0:
        return math.nan, math.nan
    a = (1 - conf) / 2
    return float(np.quantile(reps, a)), float(np.quantile(reps, 1 - a))


def cluster_quantile_ci(groups: Sequence[Sequence[float]], q: float, n_boot: int = BOOTSTRAP,
                        conf: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """Bootstrap of a pooled quantile resampling whole groups (a request's inter-token gaps): see
    `cluster_quantile_cis`."""
    return cluster_quantile_cis(groups, [q], n_boot, conf, seed)[0]


def cluster_quantile_cis(groups: Sequence[Sequence[float]], qs: Sequence[float], n_boot: int = BOOTSTRAP,
                         conf: float = CONFIDENCE, seed: int = 0, chunk: int = 1024) -> list[tuple[float, float]]:
    """Bootstrap of pooled quantiles resampling whole groups (a request's inter-token gaps), one interval per q.

    A replicate is `np.percentile` of the picked groups' gaps pooled, computed without pooling them: the gaps are
    sorted once around every q (`_window_order`), a replicate weighs each by how often its group was picked, and
    only the two order statistics the linear interpolation reads are looked up. The lookup works on a window of
    the sorted gaps around each quantile, cut into chunks of `chunk` gaps: one matrix product gives every
    replicate's weighted count per chunk (integers, exact in float32 at these sizes), so a replicate only sums the
    one chunk where its rank falls (the whole array, then sorted, where a replicate's ranks fall outside the
    window). Same draws and numbers as pooling (to the last bit of the interpolation), and each q's interval the same as bootstrapping it alone
    (every q sees the same picks); a 4000-request run's ~1M gaps cost a few milliseconds per run of 200
    replicates, not a sort per replicate."""
    groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if not groups:
        return [(math.nan, math.nan)] * len(qs)
    rng = _rng(seed)
    n_groups = len(groups)
    sizes = np.array([len(g) for g in groups])
    values = np.concatenate(groups)
    owner = np.repeat(np.arange(n_groups, dtype=np.int32), sizes)  # int32: half the bytes to gather
    n = values.size
    margin = max(256, int(0.05 * n))
    spans = [(max(0, int(q * (n - 1)) - margin), min(n, int(q * (n - 1)) + margin + 1)) for q in qs]
    # Sorted inside the windows only, the rest partitioned around them (each side the right set of gaps). Ties may
    # come in any order: the k-th weighted value lands in the same run of equal values either way.
    order = _window_order(values, spans)
    o = owner[order]  # the values only where a replicate reads one
    # The draws one replicate at a time, as pooling makes them (one call per replicate: the same stream).
    counts = np.stack([np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups) for _ in range(n_boot)])
    totals = counts @ sizes
    windows, per_chunk, first = [], [], 0
    for lo_i, hi_i in spans:
        n_chunks = -(-(hi_i - lo_i) // chunk)
        cells = np.bincount((np.arange(hi_i - lo_i) // chunk) * n_groups + o[lo_i:hi_i],
                            minlength=n_chunks * n_groups)
        windows.append((lo_i, hi_i, first, n_chunks))
        per_chunk.append(cells.reshape(n_chunks, n_groups))
        first += n_chunks
    below = np.stack([np.bincount(o[:lo_i], minlength=n_groups) for lo_i, *_ in windows], axis=1)
    starts = counts @ below  # (n_boot, len(qs)): the weighted gaps before each window
    # Every replicate's weighted gaps per chunk: integer sums far below 2**24, so float32 is exact.
    within = np.rint(counts.astype(np.float32) @ np.concatenate(per_chunk).T.astype(np.float32)).astype(np.int64)
    reps = np.empty((len(qs), n_boot))
    full = None
    for b in range(n_boot):
        total, row, whole = int(totals[b]), counts[b], None
        for j, (q, (lo_i, hi_i, first, n_chunks)) in enumerate(zip(qs, windows)):
            h = (total - 1) * q  # np.percentile's linear interpolation between ranks k and k + 1
            k = int(math.floor(h))
            k1 = min(k + 1, total - 1)
            start = int(starts[b, j])
            ends = start + np.cumsum(within[b, first:first + n_chunks])  # weighted gaps up to each chunk's end
            xs = []
            for rank in (k, k1):
                if start <= rank < ends[-1]:
                    c = int(np.searchsorted(ends, rank, side="right"))
                    a = lo_i + c * chunk
                    cw = (ends[c - 1] if c else start) + np.cumsum(row[o[a:min(a + chunk, hi_i)]])
                    xs.append(values[order[a + int(np.searchsorted(cw, rank, side="right"))]])
                else:  # outside the window: the whole array, sorted now if no replicate needed it before
                    if full is None:
                        full = np.argsort(values, kind="stable")
                        full = values[full], owner[full]
                    whole = np.cumsum(row[full[1]]) if whole is None else whole
                    xs.append(full[0][int(np.searchsorted(whole, rank, side="right"))])
            reps[j, b] = xs[0] + (h - k) * (xs[1] - xs[0])
    return [_pct_interval(r, conf) for r in reps]


def _window_order(values: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Indices that sort `values` at every position inside the spans [lo, hi) and put the right set of values
    before and after each span (the order between spans left as a partition leaves it): a partition at the spans'
    edges, then a sort of each piece a span covers. ~4x cheaper than sorting a run's ~1M gaps whole."""
    n = values.size
    cuts = sorted({c for span in spans for c in span if 0 < c < n})
    order = np.argpartition(values, cuts) if cuts else np.arange(n)
    for a, b in zip([0, *cuts], [*cuts, n]):
        if any(lo < b and a < hi for lo, hi in spans):
            piece = order[a:b]
            order[a:b] = piece[np.argsort(values[piece], kind="stable")]
    return order


def request_cis(df: pd.DataFrame, met: pd.Series, duration_s: float, conf: float = CONFIDENCE,
                sample: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Intervals of one run's statistics over its measured requests: {statistic: [low, high]}.

    Keys follow the aggregates: `slo_attainment`, `request_throughput`, `output_token_throughput`, `goodput`,
    and `<latency>.<mean|p50|p90|p99>` for ttft_s, tpot_s, e2e_s, itl_s. `sample`: the intervals that do not read
    the SLOs (`sample_cis`) where the caller keeps them for runs judged alike; an empty dict is filled in.
    """
    n = len(df)
    if not sample:
        computed = sample_cis(df, duration_s, conf)
        if sample is not None:
            sample.update(computed)
        sample = computed
    out: dict[str, Any] = {"slo_attainment": list(wilson(int(met.sum()), n, conf)) if n else [math.nan, math.nan]}
    out.update((k, v) for k, v in sample.items() if k != "output_token_throughput")
    glo, ghi = garwood(int(met.sum()), conf)
    dur = max(duration_s, 1e-9)
    out["goodput"] = [glo / dur, ghi / dur]
    out["output_token_throughput"] = sample["output_token_throughput"]
    return out


def sample_cis(df: pd.DataFrame, duration_s: float, conf: float = CONFIDENCE) -> dict[str, Any]:
    """The intervals of `request_cis` that depend on the requests alone (every one but attainment and goodput):
    the bootstraps, most of a run's judging time."""
    out: dict[str, Any] = {}
    ok = df[df["error"].isna()]
    for col in LATENCIES:
        v = _finite(ok[col]) if col in ok else np.array([])
        out[f"{col}.mean"] = list(bootstrap_ci(v, conf=conf))
        for p in PERCENTILES:
            out[f"{col}.p{p}"] = list(quantile_ci(v, p / 100, conf))
    if "itl_s" in ok:
        groups = [g for g in ok["itl_s"] if isinstance(g, (list, np.ndarray)) and len(g)]
        flat = np.concatenate([np.asarray(g, dtype=float) for g in groups]) if groups else np.array([])
        out["itl_s.mean"] = list(_cluster_mean_ci(groups, conf)) if groups else [math.nan, math.nan]
        cis = cluster_quantile_cis(groups, [p / 100 for p in PERCENTILES], n_boot=200, conf=conf)
        for p, ci in zip(PERCENTILES, cis):
            out[f"itl_s.p{p}"] = list(ci) if flat.size else [math.nan, math.nan]
    dur = max(duration_s, 1e-9)
    lo, hi = garwood(len(ok), conf)
    out["request_throughput"] = [lo / dur, hi / dur]
    toks = _finite(ok["output_tokens"]) if len(ok) else np.array([])
    if toks.size:
        mlo, mhi = bootstrap_ci(toks, conf=conf)
        out["output_token_throughput"] = [lo * mlo / dur, hi * mhi / dur]
    else:
        out["output_token_throughput"] = [0.0, hi / dur]
    return out


def _cluster_mean_ci(groups, conf: float, n_boot: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    sums = np.array([float(np.sum(g)) for g in groups])
    counts = np.array([len(g) for g in groups], dtype=float)
    idx = _draws(len(groups), n_boot, seed)
    reps = [sums[b].sum(axis=1) / counts[b].sum(axis=1) for b in _blocks(idx)]
    return _pct_interval(np.concatenate(reps), conf)


# -- one point, several seeds ----------------------------------------------------------------------------------


def _padded(frames: list[pd.DataFrame], col: str) -> np.ndarray:
    n = max(len(f) for f in frames)
    out = np.full((len(frames), n), np.nan)
    for i, f in enumerate(frames):
        out[i, : len(f)] = f[col].to_numpy(dtype=float)
    return out


def point_stats(frames: list[pd.DataFrame], durations: list[float], conf: float = CONFIDENCE,
                n_boot: int = BOOTSTRAP, seed: int = 0,
                known: Optional[dict[str, tuple[float, float]]] = None) -> dict[str, Any]:
    """Estimates and intervals of one point from its runs' measured requests (one frame per seed).

    Each frame needs `ttft_s`, `tpot_s`, `e2e_s` (NaN for failed requests), `output_tokens` and a boolean `met`
    (both SLOs met). Estimates pool the requests of every run (throughput: the runs' mean); intervals are the
    one-level ones with one run, and a two-level bootstrap (runs, then requests) widened to the pooled
    one-level interval with several. Returns flat keys: `<stat>`, `<stat>_ci_low`, `<stat>_ci_high` for
    slo_attainment, request_throughput, mean_<lat>, p<q>_<lat>; plus n_requests and n_seeds.
    `known`: one run's one-level intervals already computed over these requests with this seed (its job's own).
    """
    frames = [f.assign(**{c: np.nan for c in LATENCIES if c not in f}) for f in frames if len(f)]
    if not frames:
        return {"n_requests": 0, "n_seeds": 0}
    pooled = pd.concat(frames, ignore_index=True)
    ok = pooled[pooled["error"].isna()] if "error" in pooled else pooled
    met = pooled["met"].astype(bool)
    out: dict[str, Any] = {"n_requests": int(len(pooled)), "n_seeds": len(frames)}

    def put(name, est, lo, hi):
        out[name], out[f"{name}_ci_low"], out[f"{name}_ci_high"] = est, lo, hi

    one_level: dict[str, tuple[float, float]] = {"slo_attainment": wilson(int(met.sum()), len(pooled), conf)}
    estimates: dict[str, float] = {"slo_attainment": float(met.mean())}
    for col in LATENCIES:
        v = _finite(ok[col])
        estimates[f"mean_{col}"] = float(v.mean()) if v.size else math.nan
        one_level[f"mean_{col}"] = (known or {}).get(f"mean_{col}") or bootstrap_ci(v, conf=conf, seed=seed)
        for p in PERCENTILES:
            estimates[f"p{p}_{col}"] = float(np.percentile(v, p)) if v.size else math.nan
            one_level[f"p{p}_{col}"] = quantile_ci(v, p / 100, conf)
    thr = [len(f[f["error"].isna()]) / d if d and d > 0 else math.nan for f, d in zip(frames, durations)]
    estimates["request_throughput"] = float(np.nanmean(thr)) if not np.isnan(thr).all() else math.nan
    total_dur = float(np.nansum(durations))
    lo, hi = garwood(len(ok), conf)
    one_level["request_throughput"] = (lo / total_dur, hi / total_dur) if total_dur > 0 else (math.nan, math.nan)

    if len(frames) == 1:
        for k, est in estimates.items():
            put(k, est, *one_level[k])
        return out

    rng = _rng(seed)
    s = len(frames)
    sizes = np.array([len(f) for f in frames])
    pick = rng.integers(0, s, (n_boot, s))  # runs with replacement
    within = (rng.random((n_boot, s, sizes.max())) * sizes[pick][:, :, None]).astype(int)
    valid = np.arange(sizes.max())[None, None, :] < sizes[pick][:, :, None]

    def gather(col: str) -> np.ndarray:
        m = _padded(frames, col)
        g = m[pick[:, :, None], within]
        g[~valid] = np.nan
        return g.reshape(n_boot, -1)

    metm = gather("met")
    boot: dict[str, np.ndarray] = {"slo_attainment": np.nanmean(metm, axis=1)}
    for col in LATENCIES:
        g = gather(col)
        with warnings.catch_warnings():  # a column without values (all NaN) gives NaN, as it should
            warnings.simplefilter("ignore", RuntimeWarning)
            boot[f"mean_{col}"] = np.nanmean(g, axis=1)
            qs = np.nanpercentile(g, PERCENTILES, axis=1)
        for p, row in zip(PERCENTILES, qs):
            boot[f"p{p}_{col}"] = row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        boot["request_throughput"] = np.nanmean(np.asarray(thr, dtype=float)[pick], axis=1)
    for k, est in estimates.items():
        blo, bhi = _pct_interval(boot[k], conf)
        olo, ohi = one_level[k]
        put(k, est, _nanmin(blo, olo), _nanmax(bhi, ohi))
    return out


def _nanmin(a: float, b: float) -> float:
    return b if math.isnan(a) else a if math.isnan(b) else min(a, b)


def _nanmax(a: float, b: float) -> float:
    return b if math.isnan(a) else a if math.isnan(b) else max(a, b)
