"""Seeded draws and near-duplicate matching, shared by every split builder."""
import random
import re

NEAR_DUPLICATE_JACCARD = 0.5
_NEAR_DUP_STOPWORDS = frozenset(
    "a an the to of and or for how in on that with i you me my can is it be do what give write create someone s "
    "about from your without are as by into this at".split())


def _rng(seed, purpose):
    # One stream per split: resizing one split never reshuffles another.
    return random.Random(f"{seed}:{purpose}")


def _near_duplicate_filter(held_out):
    """A predicate: is this text a near duplicate (content-word Jaccard) of some held-out text?"""
    def words(text):
        return frozenset(re.findall(r"[a-z0-9]+", text.lower())) - _NEAR_DUP_STOPWORDS
    held_words = [words(t) for t in held_out]
    index = {}
    for i, ws in enumerate(held_words):
        for w in ws:
            index.setdefault(w, []).append(i)

    def is_near(text):
        ws = words(text)
        for i in {i for w in ws for i in index.get(w, ())}:
            if len(ws & held_words[i]) / len(ws | held_words[i]) >= NEAR_DUPLICATE_JACCARD:
                return True
        return False
    return is_near


def _alternate(positive, negative):
    """Interleave the classes so that every prefix is balanced (to within one)."""
    out = []
    for pair in zip(positive, negative):
        out.extend(pair)
    return out


def _stratified_counts(sizes, total):
    """Largest-remainder allocation of `total` draws proportional to `sizes`."""
    whole = sum(sizes.values())
    exact = {k: total * n / whole for k, n in sizes.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (counts[k] - exact[k], k))[:total - sum(counts.values())]:
        counts[k] += 1
    return counts

