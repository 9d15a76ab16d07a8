"""sinkcheck's one way to open an input file and to choose its output: the rules of the repository's common.py,
in the installed package's own small copy (it cannot import the repository).

    check_checkpoint  every file the C++ loader (config.json, the index, the shards) and the tokenizer will open
                      is a regular file: checked here, before the path goes to C++, whose open() of a FIFO would
                      block forever
    read_bytes        an input file read without blocking: a regular file only, under a size cap
    lone_surrogate    a JSON \\u escape that decodes to half a surrogate pair (no text: a tokenizer fails on it)
    check_output      --json: not empty, no FIFO, device or folder, and none of the inputs (after symlinks)
"""
import json
import os
import re
import stat
from pathlib import Path


class InputError(Exception):
    """An input or output path sinkcheck refuses; the message names it."""


def file_kind(mode):
    for test, name in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def special(path):
    """What `path` is when it exists and is neither a regular file nor a folder (a FIFO, a device, a socket), else
    None (missing paths and folders are the readers' own messages)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else file_kind(mode)


def read_bytes(path, limit):
    """The bytes of an input file, opened without blocking; InputError(reason) for a missing, unreadable,
    non-regular or larger file (reason in the words of the OS where it has them: "Is a directory", ...)."""
    kind = special(path)  # checked before it is opened: opening a socket fails, a FIFO would block without O_NONBLOCK
    if kind:
        raise InputError(f"not a regular file ({kind})")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise InputError(e.strerror) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise InputError(os.strerror(21))  # EISDIR: "Is a directory"
        if not stat.S_ISREG(mode):
            raise InputError(f"not a regular file ({file_kind(mode)})")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise InputError(e.strerror) from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InputError(f"larger than the {limit:,}-byte limit")
    return data


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)")


def lone_surrogate(line):
    """The first \\u escape of a line of JSON that decodes to a lone surrogate, or None."""
    if not _SURROGATE_ESCAPE.search(line):
        return None
    high = None
    for m in _ESCAPE.finditer(line):
        code = int(m.group(1), 16) if m.group(1) else None
        if high is not None:
            if code is not None and 0xDC00 <= code <= 0xDFFF and m.start() == high.end():
                high = None
                continue
            return high.group(0)
        if code is not None and 0xD800 <= code <= 0xDBFF:
            high = m
        elif code is not None and 0xDC00 <= code <= 0xDFFF:
            return m.group(0)
    return high.group(0) if high is not None else None


# Files beside the weights that the tokenizer of text probes may open.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")
INDEX = "model.safetensors.index.json"


def checkpoint_files(path):
    """Every file that auditing `path` opens (as the C++ loader finds them, and the tokenizer files beside them)."""
    target = Path(path)
    if target.is_dir():
        folder = target
        if (folder / INDEX).exists():
            weights = [folder / INDEX]
        elif (folder / "model.safetensors").exists():
            weights = [folder / "model.safetensors"]
        else:
            weights = sorted(folder.glob("*.safetensors"))
    else:
        folder = target.parent
        weights = [target]
    files = list(weights)
    for index in weights:
        if index.suffix == ".json" and not special(index) and index.is_file() and index.stat().st_size < 64 << 20:
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
            except (OSError, ValueError, AttributeError):
                continue  # the C++ loader names what is wrong with it
            if isinstance(weight_map, dict):
                files += [folder / name for name in sorted(set(weight_map.values()))
                          if isinstance(name, str) and name and Path(name).name == name]
    files += [folder / name for name in ("config.json",) + TOKENIZER_FILES]
    return [f for f in files if os.path.lexists(f)]


def check_checkpoint(flag, path):
    """The checkpoint PATH (or --compare's) before it goes to the C++ loader: every file it will open is a regular
    file. Returns those files (the outputs may be none of them)."""
    if not str(path).strip():
        raise InputError(f"{flag} is empty: name a checkpoint (a .safetensors file, a model folder or an index)")
    files = checkpoint_files(path)
    for file in [Path(path)] + files:
        kind = special(file)
        if kind:
            raise InputError(f"{file}: not a regular file ({kind}); sinkcheck reads checkpoints, configs and "
                             f"tokenizer files from regular files only")
    return files


def same_path(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output(flag, path, inputs):
    """The output file: not empty, not an existing FIFO, device or folder (it is written to a temporary file and
    renamed into place, which would replace it), and none of `inputs` (after symlinks and hard links)."""
    if not str(path).strip():
        raise InputError(f"{flag} is empty: name the file to write")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise InputError(f"{flag} {path}: is a folder, expected a file name")
    if mode is not None and not stat.S_ISREG(mode):
        raise InputError(f"{flag} {path}: is {file_kind(mode)}, not a regular file: the report is written to a "
                         f"temporary file and renamed into place, which would replace it; name a regular file")
    for source in inputs:
        if os.path.lexists(source) and same_path(path, source):
            raise InputError(f"{flag} {path}: is also an input ({source}); writing the report there would destroy "
                             f"it: name another file")
