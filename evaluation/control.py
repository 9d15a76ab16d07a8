"""The harm-blind control (results/PROTOCOL.md section 6): Surgery's penalty with reference sets that carry no harm
contrast, chosen among six ordered pairs of benign sources (offline/control.py) by their penalty on the untrained
aligned model, which must be within CONTROL_FACTOR of Surgery's own.

    drawn_reviews      the review sentences that some train set of the sweep draws (kept out of the sources)
    penalty_on         a pair of reference sets' penalty, positive heads and lengths on a model
    calibrate_control  every candidate measured, the first within the factor chosen, its sets written
"""
import math

import numpy as np

import offline
from common import read_json, write_json, write_jsonl
from evaluation.choices import CHOICE_SEEDS, N_TRAIN, REPORTED_SEEDS
from evaluation.stages import device_for
from evaluation.third import aligned_model, code_commit, seed_draw
from evaluation.training import train_sink_pos

# X_m vs X_r candidates, in the protocol's order (relu makes the orientation matter); the first whose penalty on the
# untrained aligned model is within CONTROL_FACTOR of Surgery's is the control.
CONTROL_CANDIDATES = (("novels", "reviews"), ("reviews", "novels"), ("claims", "reviews"), ("reviews", "claims"),
                      ("claims", "novels"), ("novels", "claims"))
CONTROL_FACTOR = 2.0


def drawn_reviews(data_seed):
    """The review sentences that some train set of this sweep (every seed, every p) draws from the benign pool."""
    splits = offline.build_splits(data_seed)
    return {offline.review_text(r["instruction"]) for seed in CHOICE_SEEDS + REPORTED_SEEDS
            for r in seed_draw(splits, seed)[1][:N_TRAIN]}


def penalty_on(model, tokenizer, harmful, harmless, ctx):
    """The sink penalty mean relu(d_h) and the positive-head count of one pair of reference sets on a model, with
    the token lengths of both sets."""
    import checks
    import surgery
    ids = [[surgery.encode(tokenizer, r, ctx.args.max_len)[0] for r in rows] for rows in (harmful, harmless)]
    d = surgery.probe_divergence(model, *ids, train_sink_pos(ctx.args), tokenizer.pad_token_id)
    d = np.asarray(d, dtype=float)
    return {"penalty": float(np.maximum(d, 0).mean()), "positive_heads": int((d > 0).sum()),
            "lengths": checks.reference_lengths(*ids)}


def calibrate_control(ctx):
    """Every candidate's penalty on the untrained aligned model beside Surgery's own (recomputed with the same code),
    the first within CONTROL_FACTOR chosen (else the closest in |log ratio|, flagged), its sets written to
    results/dev/control/ and everything to results/dev/control/calibration.json."""
    folder = ctx.results / "dev" / "control"
    if (folder / "calibration.json").exists():
        return read_json(folder / "calibration.json")
    import surgery
    from offline.control import control_pairs, harm_blind_sources
    model, tokenizer = surgery.load_model(aligned_model(ctx)["model"], device_for(ctx.args))
    refs = [offline.read_jsonl(ctx.files[k]) for k in ("harmful_ref", "harmless_ref")]
    own = penalty_on(model, tokenizer, *refs, ctx)
    sources = harm_blind_sources(ctx.args.data_seed, drawn_reviews(ctx.args.data_seed))
    candidates, sets = [], {}
    for first, second in CONTROL_CANDIDATES:
        sets[(first, second)] = control_pairs(sources, first, second, ctx.args.data_seed)
        measured = penalty_on(model, tokenizer, *sets[(first, second)], ctx)
        ratio = measured["penalty"] / own["penalty"]
        candidates.append({"X_m": first, "X_r": second, **measured, "ratio_to_surgery": ratio,
                           "within_factor": 1 / CONTROL_FACTOR <= ratio <= CONTROL_FACTOR})
        print(f"control {first} vs {second}: penalty {measured['penalty']:.3e} ({ratio:.2f}x Surgery's "
              f"{own['penalty']:.3e}), {measured['positive_heads']} positive heads", flush=True)
    chosen = next((c for c in candidates if c["within_factor"]), None)
    matched = chosen is not None
    chosen = chosen or min(candidates, key=lambda c: abs(math.log(c["ratio_to_surgery"])))
    harmful, harmless = sets[(chosen["X_m"], chosen["X_r"])]
    write_jsonl(folder / "harmful_ref.jsonl", harmful)
    write_jsonl(folder / "harmless_ref.jsonl", harmless)
    calibration = {"surgery": own, "candidates": candidates, "chosen": {"X_m": chosen["X_m"], "X_r": chosen["X_r"]},
                   "matched": matched, "factor": CONTROL_FACTOR, "source_sizes": {k: len(v) for k, v in sources.items()},
                   "model": "the aligned model, untrained by any attack", "commit": code_commit(),
                   "files": {"X_m": "harmful_ref.jsonl", "X_r": "harmless_ref.jsonl"}}
    write_json(folder / "calibration.json", calibration, strict=False)
    return calibration
