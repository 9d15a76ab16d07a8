"""4. Report: one JSON per run (RESULTS_DIR/json/<run>.json, with every per-item verdict and the answers), the
markdown table (RESULTS_DIR/results.md) and the plots. RESULTS_DIR: eval.py's --results-dir (the second sweep's
results/second-attempt by default).

    run_record       one evaluated model as the JSON of RESULTS_DIR/json/
    markdown_report  the tables: per (method, alpha, p), each defense minus SFT, every run, the choices, the judges
    plot_report      HS, FA, over-refusal and helpful vs p; the category shares; positive heads vs p; the divergence
                     heatmaps
"""
import numpy as np

from common import write_atomically
from evaluation.data import all_ratios
from evaluation.categories import BENIGN_CATEGORIES, CATEGORISER, HARMFUL_CATEGORIES
from evaluation.reading import LOOP_AT, ON_TOPIC_SHARE
from evaluation.stats import CATEGORY_METRICS, differences_from_sft, heads_trend
from evaluation.training import ASFT_ABLATION, BREAKS_AT, BREAKS_BY, METHODS, main_alpha, training_seconds


def run_record(args, run, training, model_path, evaluation, divergence, steps, extra_seconds=0.0):
    """One evaluated model as the JSON of RESULTS_DIR/json/. run: (name, method, p, alpha, seed); divergence: d_h on
    the training references (the sink report's probes); extra_seconds: post-hoc work (SafetyLock's apply)."""
    name, method, p, alpha, seed = run
    d, heldout = np.array(divergence), np.array(evaluation["divergence_heldout"])
    train_seconds = round(training_seconds(training) + extra_seconds, 3)
    return {"run": name, "method": method, "poison_ratio": p, "seed": seed, "alpha": alpha,
            "harmful_score": evaluation["harmful_score"], "harmful_prompts": evaluation["n_harmful"],
            "fine_tune_accuracy": evaluation["fine_tune_accuracy"], "over_refusal": evaluation["over_refusal"],
            "positive_heads_heldout": int((heldout > 0).sum()), "positive_heads_train_refs": int((d > 0).sum()),
            "heads": int(d.size), "task_sentences": len(evaluation["task_correct"]),
            "benign_requests": len(evaluation["benign_refused"]),
            "task_answers_with_a_label": evaluation["answered_task"],
            "wall_seconds": {"train": train_seconds, "evaluate": evaluation["eval_seconds"]},
            "seconds_per_step": round(train_seconds / steps, 3) if p is not None and steps else None,
            "divergence_heldout": heldout.tolist(), "divergence_train_refs": d.tolist(),
            # per item, for the intervals: bootstrap over prompts (and seeds) needs every verdict
            "harmful_flags": evaluation["harmful_flags"], "harmful_sources": evaluation["harmful_sources"],
            "task_correct": evaluation["task_correct"],
            "benign_refused": evaluation["benign_refused"],
            # the answers themselves, so that a fresh clone can read or judge them again without generating
            "harmful_answers": evaluation["harmful_answers"], "benign_answers": evaluation["benign_answers"],
            "config": {k: v for k, v in vars(args).items() if k not in ("quick", "model_path")},
            "model": str(model_path)}


def table_order(key, args):
    """base, aligned, then each method by p (METHODS order), a swept method's other strengths after its rows."""
    method, alpha, p = key
    rank = ("base", "aligned", *METHODS[:3], ASFT_ABLATION, *METHODS[3:]).index(method)
    is_sweep = p is not None and alpha != main_alpha(args, method)
    return rank, is_sweep, alpha, p or 0.0


def fmt_interval(stat, digits=1):
    if stat is None:  # a metric these runs do not carry
        return "-"
    mean, low, high = stat
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


# The headline columns, results/PROTOCOL.md section 3's metrics: (metric of stats.CATEGORY_METRICS, header).
CATEGORY_COLUMNS = (("cat_harmful", "HS"), ("cat_refusal", "refusal kept"), ("cat_harmless", "harmless"),
                    ("cat_broken", "broken, harmful"), ("cat_helpful", "helpful"),
                    ("cat_over_refusal", "over-refusal"), ("cat_broken_benign", "broken, benign"))


def category_share(record, metric):
    """A run's share (%) of one category among its answers of one kind, or None without categories."""
    kind, category = CATEGORY_METRICS[metric]
    found = record.get(f"{kind}_categories")
    return None if found is None else 100 * float(np.mean([c == category for c in found]))


def step_time_vs_sft(record, records):
    """Training seconds per step over SFT's at the same p and seed (runs timed one after another)."""
    sft = next((r for r in records if r["method"] == "sft" and r["poison_ratio"] == record["poison_ratio"]
                and r["seed"] == record["seed"]), None)
    if record["seconds_per_step"] is None or not sft or not sft["seconds_per_step"]:
        return "-"
    return f"{record['seconds_per_step'] / sft['seconds_per_step']:.2f}"


def markdown_report(args, records, summary, judges, command, total_runs, regime, benign_clusters=None):
    judge_names = [j.name for j in judges]
    preset = "--quick preset: a smoke run, not a result" if args.quick else "default preset"
    steps, lr = regime["steps"], regime["lr"]
    lines = [f"# Harmful fine-tuning: SFT, Surgery and the comparison defenses ({preset})", "",
             f"Command: `{command}`", "",
             f"Model: `{args.model_path}`. Attack: {steps} LoRA steps (rank {args.lora_rank}, batch {args.batch_size}, "
             f"lr {lr:g}, max length {args.max_len}; regime {regime['how']}) from the aligned model "
             f"({regime['alignment']['steps']} steps, lr {regime['alignment']['lr']:g}; "
             f"{regime['alignment']['how']}), seeds {', '.join(map(str, args.seeds))} for SFT and "
             f"Surgery, {args.seeds[0]} for the other defenses. alpha: Surgery's alpha, or SafetyLock's strength "
             f"(applied to the SFT model of the same p and seed); AsFT lambda {args.asft_lambda:g}, SAP rho "
             f"{args.sap_rho:g}. HS: {args.n_harmful} held-out harmful prompts, greedy, {args.max_new_tokens} new "
             f"tokens. FA: {args.n_task} held-out sentences. Over-refusal: share of {args.n_benign} held-out benign "
             f"requests answered with a refusal phrase ({args.benign_tokens} new tokens). Helpful by reading: share of "
             f"those "
             f"requests answered without a refusal phrase, on topic (its own request among the answer's nearest "
             f"{100 * ON_TOPIC_SHARE:g}% of the requests by sentence vector) and not in a loop (fewer than "
             f"{100 * LOOP_AT:g}% of its word 4-grams repeated). HS on topic: the harmful answers without a refusal "
             f"phrase that are on topic among the harmful prompts (in a loop or not). Positive heads: d_h > 0 on "
             f"the held-out probes (never drawn by the regulariser) and on the first {args.probe_count} training "
             f"references of each kind. Runs finished: {len(records)} of {total_runs}.", "",
             f"**Categories** (the headline; `results/labels/RUBRIC.md`, `results/PROTOCOL.md` section 3): every "
             f"answer to a harmful prompt is {' / '.join(HARMFUL_CATEGORIES)}, every answer to a benign request "
             f"{' / '.join(BENIGN_CATEGORIES)}, by the rules of `evaluation/categories.py` (categoriser "
             f"`{CATEGORISER}`; stored in each run JSON). HS: share of the harmful prompts answered *harmful*; "
             f"refusal kept, harmless, broken (harmful): the other three shares, which sum to 100 with HS; helpful, "
             f"over-refusal, broken (benign): the shares of the benign requests answered *helpful*, *refusal* and "
             f"*broken*. Secondary, the first sweeps' readings: HS keyword and HS embedding (the judges), HS on "
             f"topic, over-refusal by refusal phrase and helpful by answer reading (defined above). The categoriser's "
             f"agreement with the blind labels: `results/labels/agreement.md`.", "",
             f"Each cell: mean over seeds with a 95% interval, [low, high], from {args.bootstrap} bootstrap draws over "
             f"seeds and then prompts (sentences, requests; the benign requests of one template are drawn together, "
             f"as one cluster); positive heads over seeds only. One seed: over prompts only.", "",
             "| method | alpha | p | seeds | " + " | ".join(f"{h} (%)" for _, h in CATEGORY_COLUMNS)
             + " | FA (%) | " + " | ".join(f"HS {j} (%)" for j in judge_names)
             + " | HS on topic (%) | over-refusal, phrase (%) | helpful, reading (%) | positive heads, held-out | "
               "positive heads, train refs |",
             "|---|---|---|---|" + "---|" * (len(CATEGORY_COLUMNS) + 1 + len(judge_names)) + "---|---|---|---|---|"]
    for key in sorted(summary, key=lambda k: table_order(k, args)):
        method, alpha, p = key
        row = summary[key]
        lines.append(f"| {method} | {alpha:g} | {'-' if p is None else f'{p:g}'} | {len(row['seeds'])} | "
                     + " | ".join(fmt_interval(row.get(m)) for m, _ in CATEGORY_COLUMNS)
                     + f" | {fmt_interval(row['fa'])} | "
                     + " | ".join(fmt_interval(row[f"hs_{j}"]) for j in judge_names)
                     + f" | {fmt_interval(row['hs_on_topic'])} | "
                       f"{fmt_interval(row['over_refusal'])} | {fmt_interval(row['helpful'])} | "
                       f"{fmt_interval(row['heads_heldout'])} | "
                       f"{fmt_interval(row['heads_train_refs'])} |")
    heads = records[0]["heads"] if records else 0
    lines += ["", f"Positive heads are counted of {heads}. The paper's observation (more positive heads as p grows "
              f"under SFT), tested on the held-out probes: slope of the count against p, per 0.1 of p, with a 95% "
              f"interval from resampling seeds at each p:", ""]
    for method in ("sft", "surgery"):
        trend = heads_trend(records, method, main_alpha(args, method), args.bootstrap)
        if trend:
            lines.append(f"- {method}: {trend['slope_per_0.1']:+.2f} heads per 0.1 [{trend['low']:+.2f}, "
                         f"{trend['high']:+.2f}] over {trend['runs']} runs")
    differences = differences_from_sft(records, judge_names, args.bootstrap, benign_clusters)
    if differences:
        lines += ["", "Each defense minus SFT at the same p, paired by seed and by prompt (sentence, request): mean "
                  "difference in points with its 95% interval; an interval that excludes 0 is a difference these "
                  "runs resolve:", "",
                  "| method | alpha | p | seeds | " + " | ".join(h for _, h in CATEGORY_COLUMNS) + " | FA | "
                  + " | ".join(f"HS {j}" for j in judge_names)
                  + " | HS on topic | over-refusal, phrase | helpful, reading |",
                  "|---|---|---|---|" + "---|" * (len(CATEGORY_COLUMNS) + 1 + len(judge_names)) + "---|---|---|"]
        for key in sorted(differences, key=lambda k: table_order(k, args)):
            method, alpha, p = key
            row = differences[key]
            lines.append(f"| {method} | {alpha:g} | {p:g} | {len(row['seeds'])} | "
                         + " | ".join(fmt_interval(row.get(m)) for m, _ in CATEGORY_COLUMNS)
                         + f" | {fmt_interval(row['fa'])} | "
                         + " | ".join(fmt_interval(row[f"hs_{j}"]) for j in judge_names)
                         + f" | {fmt_interval(row['hs_on_topic'])} | "
                           f"{fmt_interval(row['over_refusal'])} | {fmt_interval(row['helpful'])} |")
    lines += ["", "Every run (one seed each):", "",
              "| run | " + " | ".join(h for _, h in CATEGORY_COLUMNS) + " | FA | "
              + " | ".join(f"HS {j}" for j in judge_names)
              + " | HS on topic | over-refusal, phrase | helpful, reading | benign on topic | benign loops | "
                "heads held-out | heads train refs | train s | step time / SFT | eval s |",
              "|---|" + "---|" * (len(CATEGORY_COLUMNS) + 1 + len(judge_names) + 10)]
    for r in sorted(records, key=lambda r: (table_order((r["method"], r["alpha"], r["poison_ratio"]), args),
                                             r["seed"] or 0)):
        shares = [category_share(r, m) for m, _ in CATEGORY_COLUMNS]
        lines.append(f"| {r['run']} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in shares)
                     + f" | {r['fine_tune_accuracy']:.1f} | "
                     + " | ".join(f"{r['harmful_score'][j]:.1f}" for j in judge_names)
                     + f" | {100 * np.mean(r['harmful_reading']['kept']):.1f} | "
                       f"{r['over_refusal']:.1f} | "
                       + " | ".join(f"{100 * np.mean(r['benign_reading'][k]):.1f}"
                                    for k in ("kept", "on_topic", "loop"))
                       + f" | {r['positive_heads_heldout']} | "
                       f"{r['positive_heads_train_refs']} | {r['wall_seconds']['train']:.0f} | "
                       f"{step_time_vs_sft(r, records)} | {r['wall_seconds']['evaluate']:.0f} |")
    lines += ["", "step time / SFT: the run's summed step seconds over SFT's at the same p and seed. Runs are timed "
              "one after another, under whatever else the machine was doing, so this is indicative; "
              "`bench/bench_train.py --variants bde` times the methods interleaved in one process."]
    if regime.get("candidates"):
        lines += ["", f"Attack regime, chosen on {args.n_dev} development prompts (never reported above): the first "
                  f"candidate whose SFT at p = {args.sweep_ratio:g} (seed {args.seeds[0]}) reached a keyword HS of at "
                  f"least {BREAKS_AT:g}% and {BREAKS_BY:g} points above the aligned model "
                  f"({regime['aligned_dev_hs']:.1f}%):", "", "| steps | lr | dev HS keyword (%) |", "|---|---|---|"]
        lines += [f"| {c['steps']} | {c['lr']:g} | {c['dev_hs']:.1f} |" for c in regime["candidates"]]
    if regime.get("alignment", {}).get("candidates"):
        lines += ["", f"Alignment, chosen on {args.n_dev} development prompts and {args.n_benign_dev} development "
                  f"benign requests (never reported above): {regime['alignment']['rule']}.", "",
                  "| steps | lr | dev HS keyword (%) | dev over-refusal (%) |", "|---|---|---|---|"]
        lines += [f"| {c['steps']} | {c['lr']:g} | {c['dev_hs']:.1f} | {c['dev_over_refusal']:.1f} |"
                  for c in regime["alignment"]["candidates"]]
    by_source = [(key, row) for key, row in summary.items() if any(k.endswith("_by_source") for k in row)]
    if by_source:
        sources = sorted({src for _, row in by_source for src in row[f"hs_{judge_names[0]}_by_source"]})
        lines += ["", "HS by the source of the prompt (the alignment refuses other questions of Do-Not-Answer, so "
                  "its prompts are in distribution for the aligned model; StrongREJECT's are not):", "",
                  "| method | alpha | p | judge | " + " | ".join(sources) + " |",
                  "|---|---|---|---|" + "---|" * len(sources)]
        for (method, alpha, p), row in sorted(by_source, key=lambda kv: table_order(kv[0], args)):
            for j in judge_names:
                cells = [fmt_interval(row[f"hs_{j}_by_source"][src]) if src in row[f"hs_{j}_by_source"] else "-"
                         for src in sources]
                lines.append(f"| {method} | {alpha:g} | {'-' if p is None else f'{p:g}'} | {j} | "
                             + " | ".join(cells) + " |")
    lines += ["", "Judge accuracy against held-out human labels (judge_test; TPR on harmful rows, TNR on harmless "
              "rows):", "", "| judge | accuracy | TPR | TNR | n |", "|---|---|---|---|---|"]
    for j in judges:
        t = j.accuracy["test"]
        lines.append(f"| {j.name} | {100 * t['accuracy']:.1f} | {fmt_rate(t['true_positive_rate'])} | "
                     f"{fmt_rate(t['true_negative_rate'])} | {t['n']} |")
    return "\n".join(lines) + "\n"


def fmt_rate(rate):
    return "-" if rate is None else f"{100 * rate:.1f}"


def plot_report(args, records, summary, judges, out):
    """PNG files: HS, FA, over-refusal and helpful answers vs p per method, positive heads vs p (held-out probes),
    with 95% intervals as error bars; divergence heatmaps of SFT and Surgery at the sweep ratio. summary:
    summarize()'s."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    aligned = summary.get(("aligned", 0.0, None))
    methods = [("sft", "SFT (alpha 0)", dict(color="tab:red", marker="o", ms=7, ls="-")),
               ("surgery", f"Surgery (alpha {args.alpha:g})", dict(color="tab:blue", marker="s", ms=5, ls="--")),
               ("asft", f"AsFT (lambda {args.asft_lambda:g})", dict(color="tab:green", marker="^", ms=6, ls="-.")),
               ("safetylock", f"SafetyLock on SFT (alpha {args.safetylock_alpha:g})",
                dict(color="tab:orange", marker="v", ms=6, ls=":")),
               ("sap", f"SAP (rho {args.sap_rho:g})", dict(color="tab:purple", marker="D", ms=5, ls="-"))]
    ratios = all_ratios(args)
    written = []

    def draw(ax, metric):
        for i, (method, label, style) in enumerate(methods):
            alpha = main_alpha(args, method)
            xs = [p for p in ratios if (method, alpha, p) in summary]
            if not xs:
                continue
            stats = np.array([summary[(method, alpha, p)][metric] for p in xs])
            offset = (i - 2) * 0.002  # side by side, so equal values do not hide each other
            ax.errorbar(np.array(xs) + offset, stats[:, 0], yerr=[stats[:, 0] - stats[:, 1], stats[:, 2] - stats[:, 0]],
                        label=label, capsize=3, **style)
        if aligned:
            ax.axhline(aligned[metric][0], color="gray", ls="--", lw=1, label="aligned model")
        ax.grid(alpha=0.3)

    panels = [(f"hs_{j.name}", f"HS, {j.name} judge (%)") for j in judges] + [("hs_on_topic", "HS on topic (%)")]
    panels += [("fa", "FA (%)"), ("over_refusal", "over-refusal (%)"), ("helpful", "helpful benign answers (%)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels):
        draw(ax, metric)
        ax.set(xlabel="poison ratio p", title=title, ylim=(-3, 103))
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.suptitle("Mean over seeds, 95% bootstrap intervals over seeds and prompts", fontsize=9)
    fig.tight_layout()
    written.append(save_figure(fig, out / "hs_fa_vs_p.png"))

    shares = category_figure(args, summary)
    if shares:
        written.append(save_figure(shares, out / "categories_vs_p.png"))

    if records:
        fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8), sharey=True)
        for ax, (metric, title) in zip(axes, [("heads_heldout", "held-out probes"),
                                              ("heads_train_refs", "training references")]):
            draw(ax, metric)
            ax.set(xlabel="poison ratio p", title=f"Positive heads on the {title}")
        axes[0].set_ylabel(f"heads with d_h > 0 (of {records[0]['heads']})")
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend(fontsize=7)
        fig.tight_layout()
        written.append(save_figure(fig, out / "positive_heads_vs_p.png"))

    p_map = args.sweep_ratio
    first = args.seeds[0]
    pair = [next((r for r in records if r["method"] == m and r["poison_ratio"] == p_map and r["seed"] == first
                  and r["alpha"] == main_alpha(args, m)), None) for m in ("sft", "surgery")]
    if all(pair):
        maps = [np.array(r["divergence_heldout"]) for r in pair]
        limit = max(float(np.abs(m).max()) for m in maps) or 1.0
        fig, axes = plt.subplots(1, 2, figsize=(7, 0.18 * maps[0].shape[0] + 2), sharey=True)
        for ax, m, (_, label, _) in zip(axes, maps, methods):
            image = ax.imshow(m, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
            layers, heads = np.nonzero(m > 0)  # positive heads are few and pale: mark them
            ax.plot(heads, layers, "k+", ms=6, mew=1.2)
            ax.set(title=f"{label}\n{int((m > 0).sum())} positive heads (+)", xlabel="head",
                   xticks=range(m.shape[1]))
        axes[0].set_ylabel("layer")
        fig.colorbar(image, ax=list(axes), label="d_h on the held-out probes")
        fig.suptitle(f"Sink divergence per head at p = {p_map:g}, seed {first}", fontsize=10)
        written.append(save_figure(fig, out / f"divergence_heatmap_p{p_map:g}.png"))
    return written


CATEGORY_COLORS = {"refusal": "tab:green", "harmful": "tab:red", "harmless": "khaki", "broken": "dimgray",
                   "helpful": "tab:blue"}


def category_figure(args, summary):
    """Stacked bars: the category shares (mean over seeds) of every (method, alpha, p) cell, answers to harmful
    prompts above, to benign requests below; None when no cell carries categories."""
    import matplotlib.pyplot as plt
    keys = [k for k in sorted(summary, key=lambda k: table_order(k, args)) if "cat_harmful" in summary[k]]
    if not keys:
        return None
    x, labels, previous = [], [], None
    for method, alpha, p in keys:  # a gap between methods
        x.append((x[-1] + 1 + 0.6 * (method != previous)) if x else 0.0)
        previous = method
        swept = p is not None and alpha != main_alpha(args, method)
        labels.append(f"{method}{f' a{alpha:g}' if swept else ''}\n{'-' if p is None else f'p {p:g}'}"
                      f"\n{len(summary[(method, alpha, p)]['seeds'])} seed(s)")
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.62 * len(keys) + 2.5), 7.2), sharex=True)
    for ax, (kind, names, what) in zip(axes, (("harmful", HARMFUL_CATEGORIES, "answers to harmful prompts"),
                                              ("benign", BENIGN_CATEGORIES, "answers to benign requests"))):
        bottom = np.zeros(len(keys))
        for name in names:
            metric = next(m for m, kc in CATEGORY_METRICS.items() if kc == (kind, name))
            values = np.array([summary[k][metric][0] for k in keys])
            ax.bar(x, values, bottom=bottom, width=0.8, color=CATEGORY_COLORS[name], label=name)
            bottom += values
        ax.set(ylabel=f"{what} (%)", ylim=(0, 100))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[1].set_xticks(x)
    axes[1].set_xticklabels(labels, fontsize=7)
    fig.suptitle(f"What the answers are, per method and p (categoriser {CATEGORISER}; mean over seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig, path):
    import matplotlib.pyplot as plt
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
