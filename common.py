"""What every command of the project shares: its error types, its argument parser, and the one way it reads
input files and writes output files.

    UserError       bad input (a flag, a file, a model): exit 2, one line on stderr, nothing written
    NonFiniteError  training diverged (a NaN or infinite loss, gradient norm or weight): exit 3
    ArgumentParser  argparse with its errors on one line (the usage is in --help)
    read_*          a file that is missing, a folder, too large, not UTF-8 or not JSON/JSONL is a UserError naming it
    write_*         under a temporary name, then renamed into place: a reader never sees a half-written file
"""
import argparse
import json
import os
from pathlib import Path


class UserError(Exception):
    """A mistake in the command line, the data or the model path: reported as one line, exit code 2."""


class NonFiniteError(Exception):
    """Training diverged (a NaN or infinite loss, gradient norm or weight): reported as one line, exit code 3."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is in --help): the command-line tools' shared parser."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def first_line(error):
    """The first line of an exception's message (a library's message can run to many lines)."""
    return (str(error).splitlines() or [type(error).__name__])[0]


# Every record is held in memory, tokenized (several times the size of its text): larger data files are refused.
MAX_DATA_BYTES = 1 << 30


def read_text_file(path):
    """The UTF-8 text of a file; a missing, unreadable, huge or non-UTF-8 file is a UserError naming it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a file")
    if not path.is_file():
        raise UserError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    if path.stat().st_size > MAX_DATA_BYTES:
        raise UserError(f"{path}: {path.stat().st_size:,} bytes, over the {MAX_DATA_BYTES >> 30} GiB limit of a "
                        f"data file (every record is held in memory): use a subset")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save it as "
                        f"UTF-8") from None


def read_json_rows(path):
    """The rows of a JSON list or a JSONL file; a missing, empty or malformed file is a UserError naming it."""
    path = Path(path)
    text = read_text_file(path)
    if text.startswith("\ufeff"):  # a UTF-8 byte-order mark, as some editors write
        text = text[1:]
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    try:
        if text.lstrip().startswith("["):
            return json.loads(text)
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if number == 1 and text.lstrip().startswith("{") and isinstance(_whole_json(text), dict):
                    raise UserError(f"{path}: one JSON object; expected a JSON list of records, or JSONL (one "
                                    f"record per line)") from None
                raise UserError(f"{path}: not JSON or JSONL ({e.msg} at line {number})") from None
        return rows
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON or JSONL ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply") from None


def _whole_json(text):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_atomically(path, write):
    """Call write(tmp) on a temporary name beside `path`, then rename it into place (creating the folder first).
    The temporary name is the process's own: two processes writing one file (eval.py's shards) each rename a whole
    file into place. A failed or interrupted write leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        # some writers create private files; outputs get the usual permissions
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def make_folder_public(folder):
    """A folder written under a temporary name gets the usual permissions before it is renamed into place."""
    os.chmod(folder, 0o777 & ~current_umask())


def write_text(path, text):
    """UTF-8 text, written atomically."""
    return write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path, obj, strict=True):
    """JSON with one-space indentation, written atomically. strict: a NaN or infinity is an error, not a `NaN` that
    no JSON reader takes."""
    return write_text(path, json.dumps(obj, indent=1, allow_nan=not strict) + "\n")


def write_jsonl(path, records):
    """One JSON record per line (non-ASCII kept as it is), written atomically."""
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
