"""The harm-blind control's reference sets (results/PROTOCOL.md section 6): three benign text sources, and pairs that
keep Surgery's reference instructions and answer each with text of two sources, matched in length to Surgery's
refusals, so that the pairs differ in the answer's source and carry no harm contrast.

    harm_blind_sources   {"novels", "reviews", "claims"}: benign texts that no split trains on or evaluates with
    control_pairs        (X_m, X_r) records for one ordered pair of sources
"""
import re

from .sampling import _rng
from .sources import _HARM_WORDS, _movie_reviews, _novel_passages, _source_paths, _topics, norm
from .splits import REVIEW_MARKER, build_splits, cut_to_length, review_text

SOURCES = ("novels", "reviews", "claims")


def _mentions(text, names):
    return any(re.search(rf"\b{re.escape(name)}\b", text) for name in names)


def harm_blind_sources(seed=0, drawn_reviews=()):
    """Per source, its texts in a fixed random order, each without a harm word (_HARM_WORDS):
    - novels: garak's novel passages, less those in a benign request (align_benign uses 100 of them);
    - reviews: movie-review sentences in no split but the benign pool, less `drawn_reviews` (the sentences some
      train set of the sweep draws from that pool) and any in a benign request;
    - claims: garak's short false claims about animals, less those naming an animal of a held-out or development
      benign request."""
    paths = _source_paths()
    splits = build_splits(seed)
    requests = " \n ".join(norm(r["instruction"]) for r in splits.align_benign + splits.eval_benign
                           + splits.eval_benign_dev)
    kept_out = {norm(review_text(r["instruction"])) for r in splits.eval_task + splits.align
                if REVIEW_MARKER in r["instruction"]} | {norm(text) for text in drawn_reviews}
    held_animals = [a for a in _topics(paths)["animal"]
                    if _mentions(" \n ".join(norm(r["instruction"]) for r in splits.eval_benign + splits.eval_benign_dev), a)]
    claims = [line.strip() for line in paths["truefalse"].read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    sources = {
        "novels": [t for t in _novel_passages(paths["novels"]) if norm(t)[:60] not in requests],
        "reviews": [t for t, _, _ in _movie_reviews(paths["reviews"])
                    if norm(t) not in kept_out and norm(t) not in requests],
        "claims": [t for t in claims if not _mentions(t.lower(), held_animals)],
    }
    for name, texts in sources.items():
        texts[:] = [t for t in dict.fromkeys(texts) if not _HARM_WORDS.search(t)]
        _rng(seed, f"control:{name}").shuffle(texts)
    return sources


def _answers(texts, lengths):
    """One answer per length from the texts in order: texts joined until the length is reached, then cut at the
    first word boundary at or past it (the rule that built Surgery's pairs); no text is used twice."""
    out, i = [], 0
    for n in lengths:
        parts = []
        while len(" ".join(parts)) < n:
            if i == len(texts):
                raise ValueError(f"the source has too little text for {len(lengths)} answers")
            parts.append(texts[i])
            i += 1
        out.append(cut_to_length(" ".join(parts), n))
    return out


def control_pairs(sources, first, second, seed=0):
    """(X_m, X_r) for the control whose X_m answers come from source `first` and X_r's from `second`: pair i keeps
    Surgery's reference instruction i, and both answers are cut at the length of Surgery's refusal i."""
    splits = build_splits(seed)
    lengths = [len(r["output"]) for r in splits.harmless_ref]
    sets = []
    for name in (first, second):
        answers = _answers(sources[name], lengths)
        sets.append([{"instruction": ref["instruction"], "output": answer,
                      "source": f"control: {name} text cut to {n} characters (Surgery's refusal {i})"}
                     for i, (ref, answer, n) in enumerate(zip(splits.harmful_ref, answers, lengths))])
    return sets[0], sets[1]
