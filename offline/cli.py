"""The command line, ``python -m offline``: write every split (JSONL) to a folder and print its path and size."""
import argparse
import sys

import math

from common import ArgumentParser, UserError, check_given, check_output, check_writable_folder

from .convert import default_model_dir
from .files import DEFAULT_TRAIN_SIZE, default_data, eval_data, poisoned_train, read_jsonl
from .sources import OfflineDataError
from .splits import build_splits

PROG = "python -m offline"


def check_args(args):
    """Every flag before any split is built: paths named and writable, the seed and ratios in range."""
    check_given("cache_dir", args.cache_dir)  # --out: check_output below refuses an empty one
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must be in [0, 2^63), got {args.seed}")
    if not 1 <= args.n_train <= 10**6:
        raise UserError(f"--n-train must be between 1 and 1,000,000, got {args.n_train}")
    for p in args.poison_ratios:
        if not (math.isfinite(p) and 0 <= p <= 1):
            raise UserError(f"--poison-ratios must be fractions in [0, 1], got {p}")
    if args.out is not None:
        check_output("--out", args.out, folder=True)
    if args.cache_dir is not None:
        check_writable_folder("--cache-dir", args.cache_dir)


def main(argv=None):
    parser = ArgumentParser(
        prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write every embedded data split (JSONL) and print its path and size. "
                    "offline/DATA_CARD.md describes each split's source and construction.")
    parser.add_argument("--out", help="folder for the files (default: the cache's data/seed<SEED>/ folder)")
    parser.add_argument("--cache-dir", help="cache root (default: $SURGERY_CACHE, else ~/.cache/surgery)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every split and sample")
    parser.add_argument("--n-train", type=int, default=DEFAULT_TRAIN_SIZE, help="records per train set")
    parser.add_argument("--poison-ratios", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2],
                        help="write one train set per harmful fraction")
    parser.add_argument("--model", action="store_true",
                        help="also convert the default model (once) and print its folder")
    args = parser.parse_args(argv)
    try:
        check_args(args)
        paths = {f"train p={p:g}": poisoned_train(p, args.n_train, args.cache_dir, args.seed, args.out)
                 for p in args.poison_ratios}
        references = default_data(args.cache_dir, seed=args.seed, n_train=args.n_train, out_dir=args.out,
                                  poison_ratio=args.poison_ratios[0])
        paths.update({k: v for k, v in references.items() if k != "train"})  # train is listed under its ratio
        paths.update(eval_data(args.cache_dir, args.seed, args.out))
        if args.model:
            print(f"{'model':<14} {default_model_dir(args.cache_dir)}")
    except (OfflineDataError, UserError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be written after all (a full disk, a permission)
        print(f"{PROG}: error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 2
    splits = build_splits(args.seed)
    print(f"{'poison pool':<14} {len(splits.poison_pool):>6}  (harmful pairs available to train sets)")
    print(f"{'benign pool':<14} {len(splits.benign_pool):>6}  (sentiment pairs available to train sets)")
    for name, path in paths.items():
        print(f"{name:<14} {len(read_jsonl(path)):>6}  {path}")
    return 0

