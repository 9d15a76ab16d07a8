"""4. Report, the statistics: means over seeds with 95% bootstrap intervals over seeds and items (prompts, sentences,
requests; the benign requests of one template drawn together), each defense minus SFT paired by seed and item, and
the paper's positive-heads trend tested as a slope.

    bootstrap_interval    two-level bootstrap: seeds, then the items of each drawn seed (or their clusters)
    item_metrics          the per-answer 0/1 readings: the category shares, the judges', FA, over-refusal, helpful
    summarize             per (method, alpha, p): every metric's mean and interval
    differences_from_sft  per (method, alpha, p): every metric minus SFT's at the same p, paired
    heads_trend           held-out positive heads against p: the slope per 0.1 with its interval
"""
import numpy as np


def bootstrap_interval(per_seed_items, iterations, seed=0, clusters=None):
    """Mean over seeds and items with a 95% percentile interval from a two-level bootstrap: seeds drawn with
    replacement, then the items (prompts, sentences) of each drawn seed with replacement. per_seed_items: one
    0/1 (or numeric) list per seed, all of one length. With one seed it is a bootstrap over items alone.
    clusters: a label per item; items of one label (requests from one template) are drawn together, since they
    succeed or fail together and drawing them one by one would make the interval too narrow."""
    values = np.asarray(per_seed_items, dtype=np.float64)  # [seeds, items]
    rng = np.random.default_rng(seed)
    k, n = values.shape
    labels = np.unique(np.asarray(clusters if clusters is not None else range(n), dtype=str), return_inverse=True)[1]
    c = int(labels.max()) + 1
    sums = np.stack([np.bincount(labels, weights=row, minlength=c) for row in values])  # [seeds, clusters]
    sizes = np.bincount(labels, minlength=c).astype(np.float64)
    seeds = rng.integers(k, size=(iterations, k))
    means = np.empty(iterations)
    for b in range(iterations):  # [k, c] per draw: small enough to loop over draws
        drawn = rng.integers(c, size=(k, c))
        means[b] = sums[seeds[b][:, None], drawn].sum() / sizes[drawn].sum()
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def request_clusters(records):
    """A label per request: its template where it was built from one (the offline splits' sources say "via template"),
    else the request itself."""
    return [r.get("source", "").partition(" via template ")[2] or r["instruction"] for r in records]


def seed_interval(per_seed_values, iterations, seed=0):
    """Mean of one number per seed with a 95% bootstrap interval over seeds (degenerate with one seed)."""
    return bootstrap_interval([[v] for v in per_seed_values], iterations, seed)


def group_runs(records):
    """{(method, alpha, p): [records of its seeds]} for the attacks; base and aligned under p = None."""
    groups = {}
    for r in records:
        groups.setdefault((r["method"], r["alpha"], r["poison_ratio"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["seed"] or 0) for k, v in groups.items()}


# The category shares (evaluation/categories.py; results/PROTOCOL.md section 3): metric -> (kind, category).
CATEGORY_METRICS = {"cat_harmful": ("harmful", "harmful"), "cat_refusal": ("harmful", "refusal"),
                    "cat_harmless": ("harmful", "harmless"), "cat_broken": ("harmful", "broken"),
                    "cat_helpful": ("benign", "helpful"), "cat_over_refusal": ("benign", "refusal"),
                    "cat_broken_benign": ("benign", "broken")}
# read on the benign requests, whose templates cluster them
BENIGN_METRICS = ("over_refusal", "helpful", "cat_helpful", "cat_over_refusal", "cat_broken_benign")


def item_metrics(judge_names):
    """{metric: record -> its per-item 0/1 list}: each answer's category (one 0/1 list per category and kind), every
    judge's verdicts on the harmful prompts and the keyword judge's harmful answers that are on topic
    (answer_reading), the task sentences answered correctly, the benign requests refused, and those answered
    helpfully (answer_reading)."""
    return {**{name: (lambda r, kind=kind, category=category: [int(c == category) for c in r[f"{kind}_categories"]])
               for name, (kind, category) in CATEGORY_METRICS.items()},
            **{f"hs_{j}": (lambda r, j=j: r["harmful_flags"][j]) for j in judge_names},
            "hs_on_topic": lambda r: r["harmful_reading"]["kept"],
            "fa": lambda r: r["task_correct"], "over_refusal": lambda r: r["benign_refused"],
            "helpful": lambda r: r["benign_reading"]["kept"]}


def measured(name, runs):
    """Whether every run carries what metric `name` reads (a run JSON categorised before its report does)."""
    return name not in CATEGORY_METRICS or all(f"{CATEGORY_METRICS[name][0]}_categories" in r for r in runs)


def item_interval(name, per_seed_items, iterations, benign_clusters):
    """bootstrap_interval of one item metric (in %); the benign requests drawn by benign_clusters, when those label
    as many requests as the runs have."""
    clusters = (benign_clusters if name in BENIGN_METRICS and benign_clusters
                and len(benign_clusters) == len(per_seed_items[0]) else None)
    return bootstrap_interval(per_seed_items, iterations, clusters=clusters)


def summarize(records, judge_names, iterations, benign_clusters=None):
    """Per (method, alpha, p): each metric's mean and interval, and the number of seeds. benign_clusters: the
    benign requests' request_clusters(), for the intervals of over-refusal and helpful."""
    out = {}
    for key, runs in group_runs(records).items():
        row = {"seeds": [r["seed"] for r in runs]}
        for name, items in item_metrics(judge_names).items():  # per-item 0/1 values, as percentages
            if not measured(name, runs):
                continue
            row[name] = item_interval(name, [[100 * x for x in items(r)] for r in runs], iterations, benign_clusters)
        sources = runs[0].get("harmful_sources") or []
        for source in sorted(set(sources)) if len(set(sources)) > 1 else []:  # the prompts of one source
            keep = [i for i, s in enumerate(sources) if s == source]
            for j in judge_names:
                row.setdefault(f"hs_{j}_by_source", {})[source] = bootstrap_interval(
                    [[100 * r["harmful_flags"][j][i] for i in keep] for r in runs], iterations)
        row["heads_heldout"] = seed_interval([r["positive_heads_heldout"] for r in runs], iterations)
        row["heads_train_refs"] = seed_interval([r["positive_heads_train_refs"] for r in runs], iterations)
        out[key] = row
    return out


def differences_from_sft(records, judge_names, iterations, benign_clusters=None):
    """{(method, alpha, p): {metric: (mean, low, high), "seeds": [...]}}: each defense minus SFT at the same p, paired
    by seed (same train data and order) and by item (same prompt, sentence, request), so that what the two runs
    share cancels; the interval is bootstrap_interval's over the per-item differences."""
    sft = {(r["poison_ratio"], r["seed"]): r for r in records if r["method"] == "sft"}
    out = {}
    for (method, alpha, p), runs in group_runs(records).items():
        pairs = [(r, sft[(p, r["seed"])]) for r in runs if method != "sft" and (p, r["seed"]) in sft]
        if not pairs:
            continue
        row = {"seeds": [r["seed"] for r, _ in pairs]}
        for name, items in item_metrics(judge_names).items():
            if not measured(name, [r for pair in pairs for r in pair]):
                continue
            diffs = [[100 * (x - y) for x, y in zip(items(r), items(s))] for r, s in pairs]
            row[name] = item_interval(name, diffs, iterations, benign_clusters)
        out[(method, alpha, p)] = row
    return out


def heads_trend(records, method, alpha, iterations, seed=0):
    """The paper's observation, tested: slope of held-out positive heads against p (heads per 0.1 of p) over a
    method's runs, with a 95% interval from resampling the seeds at each p. None with fewer than two ratios."""
    by_p = {}
    for r in records:
        if r["method"] == method and r["alpha"] == alpha and r["poison_ratio"] is not None:
            by_p.setdefault(r["poison_ratio"], []).append(r["positive_heads_heldout"])
    if len(by_p) < 2:
        return None
    ratios = sorted(by_p)

    def slope(samples):
        xs = np.concatenate([[p] * len(v) for p, v in zip(ratios, samples)])
        return 0.1 * float(np.polyfit(xs, np.concatenate(samples), 1)[0])
    rng = np.random.default_rng(seed)
    draws = [slope([np.asarray(by_p[p])[rng.integers(len(by_p[p]), size=len(by_p[p]))] for p in ratios])
             for _ in range(iterations)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"slope_per_0.1": slope([np.asarray(by_p[p]) for p in ratios]), "low": float(low), "high": float(high),
            "runs": sum(len(v) for v in by_p.values())}
