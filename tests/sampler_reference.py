"""Reference samplers for the tests, written from KoboldCpp's published sampler descriptions (gpttype_adapter.cpp:
SampleLogits and its sample_* functions) one candidate list at a time, in plain Python floats: the
engine's batched device versions (fitllm/engine/sampling/) are checked against these probability tables.

A candidate list is a list of [token id, logit]; "removing" shortens the list, "silencing" subtracts 999
as KoboldCpp does."""

from __future__ import annotations

import math

Cands = list[list[float]]


def softmax(c: Cands) -> list[float]:
    c.sort(key=lambda x: -x[1])
    m = c[0][1]
    e = [math.exp(x[1] - m) for x in c]
    s = sum(e)
    return [v / s for v in e]


def top_k(c: Cands, k: int, min_p: float = 0.0, nsigma: float = 0.0) -> Cands:
    if min_p > 0 and nsigma > 0:
        return c
    k = len(c) if k <= 0 else k
    k = min(max(k, 1), len(c))
    c.sort(key=lambda x: -x[1])
    return c[:k]


def top_a(c: Cands, a: float) -> Cands:
    if a <= 0 or len(c) <= 1:
        return c
    p = softmax(c)
    thr = a * p[0] * p[0]
    for i in range(1, len(c)):
        if p[i] < thr:
            return c[:i]
    return c


def top_p(c: Cands, top: float) -> Cands:
    if top >= 1:
        return c
    p = softmax(c)
    cum = 0.0
    for i, v in enumerate(p):
        cum += v
        if cum >= top:
            return c[: i + 1]
    return c


def min_p(c: Cands, mp: float) -> Cands:
    if mp <= 0:
        return c
    c.sort(key=lambda x: -x[1])
    floor = c[0][1] + math.log(mp)
    for i in range(1, len(c)):
        if c[i][1] < floor:
            return c[:i]
    return c


def tail_free(c: Cands, z: float) -> Cands:
    if z >= 1 or len(c) <= 2:
        return c
    p = softmax(c)
    d2 = [abs((p[i] - p[i + 1]) - (p[i + 1] - p[i + 2])) for i in range(len(c) - 2)]
    s = sum(d2)
    d2 = [v / s for v in d2] if s > 1e-6 else [1 / len(d2)] * len(d2)
    cum = 0.0
    for i, v in enumerate(d2):
        cum += v
        if cum > z and i >= 1:
            return c[:i]
    return c


def typical(c: Cands, typ: float) -> Cands:
    if typ >= 1:
        return c
    p = softmax(c)
    h = -sum(v * math.log(v) for v in p if v > 0)
    score = [abs(-math.log(v) - h) if v > 0 else math.inf for v in p]
    order = sorted(range(len(c)), key=lambda i: score[i])
    cum = 0.0
    last = len(c)
    for n, i in enumerate(order):
        cum += p[i]
        if cum > typ:
            last = n + 1
            break
    return [c[i] for i in order[:last]]


def smoothing(c: Cands, factor: float, curve: float = 1.0) -> None:
    softmax(c)
    h = c[0][1]
    k, s = (3 - curve) / 2, (curve - 1) / 2
    for x in c:
        d = x[1] - h
        x[1] = -(k * factor * d * d) + (s * factor * d * d * d) + h


def temperature(c: Cands, t: float, smooth: float = 0.0, curve: float = 1.0) -> Cands:
    greedy = t <= 0
    if greedy:
        t, smooth = 1 / 256, 0.0
    for x in c:
        x[1] /= t
    if smooth > 0 and len(c) > 1:
        smoothing(c, smooth, curve)
    return top_k(c, 1) if greedy else c


def dynatemp(c: Cands, t: float, rng: float, exp: float, smooth: float = 0.0) -> Cands:
    lo, hi, exp = max(0.0, t - rng), max(0.0, t + rng), max(0.0, exp)
    if len(c) <= 1:
        return c
    max_h = math.log(len(c))
    p = softmax(c)
    h = -sum(v * math.log(v) for v in p if v > 0)
    dyn = lo + (hi - lo) * (h / max_h) ** exp
    for x in c:
        x[1] /= dyn
    if smooth > 0:
        smoothing(c, smooth)
    return c


def top_n_sigma(c: Cands, n: float) -> Cands:
    if n <= 0 or len(c) <= 1:
        return c
    vals = [x[1] for x in c]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    top = max(vals)
    for x in c:
        if x[1] < top - n * std:
            x[1] -= 999
    return c


def rep_pen(c: Cands, seen: set[int], pen: float, presence: float = 0.0) -> Cands:
    """The penalty for tokens in the window (all of them in the near half in these tests)."""
    for x in c:
        if int(x[0]) in seen:
            x[1] = x[1] * pen if x[1] <= 0 else x[1] / pen
            x[1] -= presence
    return c


def xtc(c: Cands, threshold: float, probability: float, roll: float) -> Cands:
    if threshold > 0.5 or probability <= 0 or len(c) <= 1 or roll >= probability:
        return c
    p = softmax(c)
    last = next((i for i, v in enumerate(p) if v < threshold), len(c))
    if last > 1:
        for i in range(last - 1):
            c[i][1] -= 999
    return c


def distribution(c: Cands) -> dict[int, float]:
    p = softmax(c)
    return {int(x[0]): v for x, v in zip(c, p, strict=True)}


def dry(
    tokens: list[int], multiplier: float, base: float, allowed: int, last_n: int, breakers: set[int]
) -> dict:
    """{token: penalty} by brute force from the description, single-token breakers: for each position j
    of the window (but the last), the longest k with tokens[j-k+1..j] == the last k tokens, both inside the
    window and after the latest breaker; token j+1 gets multiplier * base ** (k - allowed) if k >= allowed."""
    n = len(tokens)
    start = 0 if last_n <= 0 else max(0, n - last_n)
    window = n - start
    if window <= allowed:
        return {}
    limit = window
    for i in range(window):
        if tokens[n - 1 - i] in breakers:
            limit = i
            break
    if limit <= allowed:
        return {}
    best: dict[int, int] = {}
    for j in range(start, n - 1):
        k = 0
        while j - k >= start and tokens[j - k] == tokens[n - 1 - k] and k < limit:
            k += 1
        if k >= allowed:
            best[tokens[j + 1]] = max(best.get(tokens[j + 1], 0), k)
    cap = int(88.7228391 / math.log(base)) if base > 1.000001 else 0
    return {t: multiplier * base ** (min(k - allowed, cap) if cap else k - allowed) for t, k in best.items()}
