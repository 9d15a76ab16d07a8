"""Writes sinkcheck's built-in probe set, checker/sinkcheck/data/builtin_probes.jsonl, from the offline package.

The records are offline.probe_records(seed): held-out probe pairs, paired by instruction (the same harmful
instruction answered once with its harmful answer cut to the refusal's length, once with a real refusal), built
from 64 harmful instructions that are never used as Surgery's reference pairs, never trained on and never
evaluated. Each record keeps its `source` (package, file and row); the first line is a {"_meta": ...} record
that sinkcheck skips, naming the generator and the licences.

    .venv/bin/python checker/make_builtin_probes.py [--seed 0] [--out checker/sinkcheck/data/builtin_probes.jsonl]

The output is committed; run this again (and commit) when the offline package's probe pairs change.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "checker" / "sinkcheck" / "data" / "builtin_probes.jsonl"

# Licences of the packages the records are read from (offline.PACKAGES pins the versions).
LICENCES = {"pyrit": "MIT (pyrit, Microsoft; see its LICENSE and NOTICE.txt)"}


def render(records, seed):
    packages = sorted({r["source"].split("==")[0] for r in records})
    unknown = [p for p in packages if p not in LICENCES]
    if unknown:
        raise SystemExit(f"no licence noted for {unknown}: add it to LICENCES before shipping their text")
    meta = {"_meta": {
        "what": "sinkcheck's built-in probes: harmful vs refusal answers to the same harmful instructions, "
                "length-matched; held out from Surgery's reference pairs, training and evaluation",
        "generator": f"checker/make_builtin_probes.py --seed {seed} (offline.probe_records)",
        "records": {"harmful": sum(r["harmful"] for r in records), "harmless": sum(not r["harmful"] for r in records)},
        "licences": {p: LICENCES[p] for p in packages},
        "per_record_source": "each record's 'source' names the package, file and item it was read from"}}
    lines = [meta] + [{"instruction": r["instruction"], "output": r["output"], "harmful": bool(r["harmful"]),
                       "source": r["source"]} for r in records]
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import offline
    from common import write_text
    records = offline.probe_records(args.seed)
    write_text(args.out, render(records, args.seed))
    print(f"wrote {args.out}: {sum(r['harmful'] for r in records)} harmful, "
          f"{sum(not r['harmful'] for r in records)} harmless records")


if __name__ == "__main__":
    main()
