"""What every command of the project shares: its error types, its argument parser, the one way it opens an input
file and the one way it chooses an output.

    UserError       bad input (a flag, a file, a model): exit 2, one line on stderr, nothing written
    NonFiniteError  training diverged (a NaN or infinite loss, gradient norm or weight): exit 3
    ArgumentParser  argparse with its errors on one line (the usage is in --help) and no abbreviated flags
    cause           a library's exception as part of one line (its type where the message alone is not enough)
    read_*          every input file: a regular file only (a FIFO, a device, a folder is refused before it is
                    opened), under a size cap, UTF-8 text whose every JSON string is text (no lone surrogate);
                    anything else is a UserError naming the file (and the line)
    check_folder_files  an input folder (a model) holds no FIFO or device a library would block on
    check_output    every output: not empty, not an input (after symlinks), not an existing non-file (a file
                    output) or non-folder (a folder output), in a folder that can be written
    write_*         under a temporary name, then renamed into place: a reader never sees a half-written file
"""
import argparse
import json
import os
import re
import stat
from pathlib import Path


class UserError(Exception):
    """A mistake in the command line, the data or the model path: reported as one line, exit code 2."""


class NonFiniteError(Exception):
    """Training diverged (a NaN or infinite loss, gradient norm or weight): reported as one line, exit code 3."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is in --help) and no abbreviated flags (`--alph 0` is an
    unknown flag, not --alpha 0): the command-line tools' shared parser. Its subcommand parsers are of the same
    class, so they share both."""

    def __init__(self, *args, allow_abbrev=False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def first_line(error):
    """The first line of an exception's message (a library's message can run to many lines)."""
    return (str(error).splitlines() or [type(error).__name__])[0]


def cause(error, limit=300):
    """What a library's exception says, as part of one line: its message with the whitespace collapsed (cut at
    `limit` characters), after its type where the message alone does not say what happened (a KeyError's is only
    the key)."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    if isinstance(error, (OSError, ValueError, UserError)) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ----------------------------------------------------------------------------------------------------------------
# Input files: the one way every command opens one
# ----------------------------------------------------------------------------------------------------------------

# Every record is held in memory, tokenized (several times the size of its text): larger data files are refused.
MAX_DATA_BYTES = 1 << 30


def file_kind(mode):
    """What a file of this st_mode is, in words."""
    for test, name in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_input_file(path):
    """The check every input file passes before it is opened: it exists and is a regular file (after symlinks). A
    FIFO would block the reader forever, a device (/dev/zero) never ends, a folder is no file: each is a UserError
    naming the path. Returns its os.stat_result."""
    path = Path(path)
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{path}: no such file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"{path}: is a folder, expected a file")
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{path}: not a regular file ({file_kind(info.st_mode)}); inputs are read from regular "
                        f"files only")
    return info


def too_large(path, size, max_bytes, what):
    if what == "a data file":
        return UserError(f"{path}: {size:,} bytes, over the {max_bytes >> 30} GiB limit of a data file (every "
                         f"record is held in memory): use a subset")
    return UserError(f"{path}: {size:,} bytes, over the {max_bytes:,}-byte limit of {what}")


def read_input_bytes(path, max_bytes=MAX_DATA_BYTES, what="a data file"):
    """The bytes of an input file: check_input_file's checks, a size cap (None: none), and the file opened without
    blocking and checked again once open (a FIFO put in its place in between is refused, not waited on)."""
    path = Path(path)
    info = check_input_file(path)
    if max_bytes is not None and info.st_size > max_bytes:
        raise too_large(path, info.st_size, max_bytes, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise UserError(f"{path}: not a regular file ({file_kind(opened.st_mode)}); inputs are read from "
                            f"regular files only")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    finally:
        os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:  # it grew after the check
        raise too_large(path, len(data), max_bytes, what)
    return data


def read_text_file(path, max_bytes=MAX_DATA_BYTES, what="a data file"):
    """The UTF-8 text of an input file (read_input_bytes); a missing, unreadable, huge, non-regular or non-UTF-8
    file is a UserError naming it."""
    path = Path(path)
    data = read_input_bytes(path, max_bytes, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save it as "
                        f"UTF-8") from None


# A \\u escape of a UTF-16 surrogate: json.loads turns a lone one ("\\ud800") into a str that is no text (UTF-8
# cannot encode it, a tokenizer fails on it). Decoded UTF-8 never holds one, so only such escapes can.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)")


def lone_surrogate(text):
    """(line number, escape) of the first \\u escape in JSON text that decodes to a lone surrogate (a high one not
    followed at once by a low one, or a low one alone), or None. The escapes are read in order, so an escaped
    backslash before "ud800" is no escape."""
    if not _SURROGATE_ESCAPE.search(text):
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if not _SURROGATE_ESCAPE.search(line):
            continue
        high = None  # the pending high surrogate escape
        for m in _ESCAPE.finditer(line):
            code = int(m.group(1), 16) if m.group(1) else None
            if high is not None:
                if code is not None and 0xDC00 <= code <= 0xDFFF and m.start() == high.end():
                    high = None
                    continue
                return number, high.group(0)
            if code is not None and 0xD800 <= code <= 0xDBFF:
                high = m
            elif code is not None and 0xDC00 <= code <= 0xDFFF:
                return number, m.group(0)
        if high is not None:
            return number, high.group(0)
    return None


def check_encodable(text, path):
    """JSON text whose every string is text: a lone surrogate escape is a UserError naming the file and line."""
    found = lone_surrogate(text)
    if found:
        number, escape = found
        raise UserError(f"{path}: line {number}: the escape {escape} is half of a UTF-16 surrogate pair, which is no "
                        f"character (UTF-8 cannot encode it); write the character itself or a whole pair")


def read_json(path, max_bytes=MAX_DATA_BYTES, what="a data file"):
    """One JSON value from an input file (read_text_file, and every string in it encodable)."""
    path = Path(path)
    text = read_text_file(path, max_bytes, what)
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply") from None
    check_encodable(text, path)
    return value


def read_json_rows(path):
    """The rows of a JSON list or a JSONL file; a missing, empty or malformed file, or one holding a string that is
    no text (a lone surrogate escape), is a UserError naming it."""
    return parse_json_rows(read_text_file(Path(path)), path)


def parse_json_rows(text, path):
    """read_json_rows on a file's text already read; path names it in errors."""
    path = Path(path)
    if text.startswith("\ufeff"):  # a UTF-8 byte-order mark, as some editors write
        text = text[1:]
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
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
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON or JSONL ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply") from None
    check_encodable(text, path)
    return rows


def _whole_json(text):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None


def check_folder_files(folder, what="a model folder"):
    """Every entry of an input folder that a library may open (config, weights, tokenizer files) is a regular file
    or a folder: a FIFO there would block the library's reader forever, a device never end."""
    folder = Path(folder)
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise UserError(f"{folder}: cannot list it ({e.strerror})") from None
    for entry in entries:
        try:
            mode = os.stat(entry).st_mode
        except OSError:
            continue  # a dangling link: the library's own error, if it needs that file
        if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            raise UserError(f"{entry}: not a regular file ({file_kind(mode)}); {what} holds regular files only")


# ----------------------------------------------------------------------------------------------------------------
# Outputs: the one way every command chooses one
# ----------------------------------------------------------------------------------------------------------------

def check_given(flag, value, default_note=""):
    """An empty string is a value, not an absence: `--x ""` is an error, never the default."""
    if value is not None and not str(value).strip():
        raise UserError(f"--{flag.lstrip('-').replace('_', '-')} is empty: name a path{default_note}")


def same_path(a, b):
    """Whether two paths name one file or folder (after symlinks; os.path.samefile where both exist)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def is_inside(child, folder):
    """Whether `child` lies inside `folder` (after symlinks)."""
    child, folder = os.path.realpath(child), os.path.realpath(folder)
    return child != folder and child.startswith(folder.rstrip(os.sep) + os.sep)


def check_writable_folder(flag, folder):
    """A folder that exists, or can be made, and can be written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder}: is {file_kind(folder.stat().st_mode)}, expected a folder")
    existing = folder.absolute()
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is {file_kind(os.lstat(existing).st_mode)}, so the folder "
                        f"cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: {existing} is not writable")


def check_output(flag, path, inputs=(), folder=False, replaced_whole=False):
    """The one way a command chooses an output, before anything is read or written. `path` is refused when it is
    empty; when it is, or resolves to (symlinks, hard links), one of the command's `inputs` ((flag, path) pairs; a
    file output is also refused as an existing file inside an input folder); when it exists and is not a regular
    file (a file output: a FIFO, a device, a folder) or not a folder (a folder output); and when its folder cannot
    be written. replaced_whole: a folder output renamed into place whole (its parent must be writable) may hold no
    input either. Returns the Path."""
    check_given(flag, path)
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None  # absent (or below a file: check_writable_folder says so)
    if mode is not None:
        if folder and not stat.S_ISDIR(mode):
            raise UserError(f"{flag} {path}: is {file_kind(mode)}, expected a folder")
        if not folder and stat.S_ISDIR(mode):
            raise UserError(f"{flag} {path}: is a folder, expected the name of a file to write")
        if not folder and not stat.S_ISREG(mode):
            raise UserError(f"{flag} {path}: is {file_kind(mode)}, not a regular file: an output is written to a "
                            f"temporary file and renamed into place, which would replace it; name a regular file")
    for input_flag, source in inputs:
        if source is None or not str(source).strip() or not os.path.lexists(source):
            continue
        where = f"{input_flag} {source}" if input_flag else str(source)
        if same_path(path, source):
            raise UserError(f"{flag} {path}: is also an input ({where}); writing it would destroy that input: "
                            f"name another {'folder' if folder else 'file'}")
        if mode is not None and not folder and os.path.isdir(source) and is_inside(path, source):
            raise UserError(f"{flag} {path}: is a file of an input folder ({where}); writing it would change that "
                            f"input: name a file elsewhere")
        if folder and replaced_whole and is_inside(source, path):
            raise UserError(f"{flag} {path}: holds an input ({where}), and it is replaced whole: name another "
                            f"folder")
    check_writable_folder(flag, path if folder and not replaced_whole else path.parent)
    return path


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
