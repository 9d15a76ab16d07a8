"""Probe sets: token ids from checkpoint metadata or a JSON file, or text records tokenized with the model's chat template."""
import json
from pathlib import Path

from . import _core
from .files import InputError, lone_surrogate, read_bytes

METADATA_KEY = "sinkcheck.probes"
INT32_MAX = 2**31 - 1
MAX_PROBE_BYTES = 256 << 20  # a probes file is held in memory as Python lists: larger ones are refused


class ProbeError(Exception):
    """The probes are missing or malformed; the message names the source."""


BUILTIN_FILE = "builtin_probes.jsonl"  # in the package's data/ folder; written by make_builtin_probes.py


class Probes:
    """Token id lists per set; `kind` names the set for reports ("metadata", "file:PATH", "built-in"),
    `source` is the longer description used in messages."""

    def __init__(self, harmful, harmless, sink_position, source, kind):
        self.harmful = harmful
        self.harmless = harmless
        self.sink_position = sink_position
        self.source = source
        self.kind = kind


def _id_lists(value, field, source):
    if not isinstance(value, list) or not value:
        raise ProbeError(f"{source}: '{field}' must be a non-empty list of token id lists")
    for k, seq in enumerate(value):
        if not isinstance(seq, list) or not all(type(t) is int and 0 <= t <= INT32_MAX for t in seq):
            raise ProbeError(f"{source}: '{field}' sequence {k} is not a list of non-negative token ids")
    return value


def from_token_json(obj, source, kind):
    """{"sink_position": s, "harmful": [[ids]...], "harmless": [[ids]...]} (sink_position defaults to 0)."""
    if not isinstance(obj, dict):
        raise ProbeError(f"{source}: probes must be a JSON object with 'harmful' and 'harmless' token id lists")
    sink = obj.get("sink_position", 0)
    if type(sink) is not int or not 0 <= sink <= INT32_MAX:
        raise ProbeError(f"{source}: 'sink_position' must be a non-negative integer up to {INT32_MAX}")
    return Probes(_id_lists(obj.get("harmful"), "harmful", source),
                  _id_lists(obj.get("harmless"), "harmless", source), sink, source, kind)


def from_metadata(path):
    """The probes surgery.py stores in the checkpoint's __metadata__, or None when there are none."""
    text = _core.read_metadata(str(path)).get(METADATA_KEY)
    if text is None:
        return None
    source = f"{path} (metadata '{METADATA_KEY}')"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProbeError(f"{source}: not valid JSON ({e.msg})") from None
    return from_token_json(obj, source, "metadata")


def _records(text, source):
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProbeError(f"{source}: line {number} is not JSON ({e.msg})") from None
        escape = lone_surrogate(line)
        if escape:
            raise ProbeError(f"{source}: line {number}: the escape {escape} is half of a UTF-16 surrogate pair, "
                             f"which is no character (UTF-8 cannot encode it); write the character itself")
        if isinstance(rec, dict) and "_meta" in rec:
            continue  # a comment record: where the file came from, licences
        instruction = rec.get("instruction", rec.get("prompt")) if isinstance(rec, dict) else None
        output = rec.get("output", rec.get("response")) if isinstance(rec, dict) else None
        harmful = rec.get("harmful") if isinstance(rec, dict) else None
        if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(harmful, bool):
            raise ProbeError(f"{source}: line {number} needs string fields 'instruction' and 'output' "
                             f"and a boolean 'harmful'")
        extra = rec.get("input") or ""
        if not isinstance(extra, str):
            raise ProbeError(f"{source}: line {number}: 'input' must be a string")
        records.append((instruction + ("\n\n" + extra if extra else ""), output, harmful))
    return records


def tokenize_records(records, model_dir, source):
    """Chat-formatted ids, built as surgery.py builds them: the prompt with the generation prompt, then the answer."""
    try:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # any failure to load the tokenizer is a problem with the model folder
        raise ProbeError(f"{source}: cannot load the tokenizer from {model_dir} ({type(e).__name__}: {e})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ProbeError(f"{source}: the tokenizer in {model_dir} has no chat template")
    ids = []
    for instruction, output, _ in records:
        user = [{"role": "user", "content": instruction}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": output}], tokenize=False)
        if not full.startswith(prompt):
            raise ProbeError(f"{source}: the chat template does not render the prompt as a prefix of the conversation")
        ids.append(tokenizer(prompt, add_special_tokens=False)["input_ids"]
                   + tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"])
    return ids


def from_file(path, model_dir):
    """Token ids (a JSON object) or text records (JSONL: instruction, output, harmful)."""
    path = Path(path)
    source = str(path)
    if not source.strip():
        raise ProbeError("--probes is empty: name a probes file")
    try:  # without blocking: a FIFO or a device is refused, not read forever
        text = read_bytes(path, MAX_PROBE_BYTES).decode("utf-8")
    except (InputError, UnicodeDecodeError) as e:
        raise ProbeError(f"cannot read probes file {source}: {e}") from None
    if not text.strip():
        raise ProbeError(f"{source}: probes file is empty")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and ("harmful" in obj and isinstance(obj["harmful"], list) or "harmless" in obj):
        return from_token_json(obj, source, f"file:{source}")
    return _from_records(_records(text, source), model_dir, source, f"file:{source}")


def _from_records(records, model_dir, source, kind):
    harmful = [r for r in records if r[2]]
    harmless = [r for r in records if not r[2]]
    if not harmful or not harmless:
        raise ProbeError(f"{source}: needs at least one record with \"harmful\": true and one with false")
    return Probes(tokenize_records(harmful, model_dir, source), tokenize_records(harmless, model_dir, source), 0,
                  source, kind)


def builtin_path():
    """The packaged probe file (JSONL text records, held-out harmful vs refusal pairs; see its _meta line)."""
    from importlib import resources
    return resources.files(__package__) / "data" / BUILTIN_FILE


def builtin(model_dir, why_not_others):
    """The built-in probe set, tokenized with the folder's tokenizer and chat template. `why_not_others` says
    why no other set was found; it goes into the message when the folder cannot tokenize text."""
    path = builtin_path()
    source = f"built-in probes ({BUILTIN_FILE})"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProbeError(f"no probes found: {why_not_others}, and the built-in probe file cannot be read "
                         f"({e}); reinstall sinkcheck or pass --probes FILE") from None
    records = _records(text, source)
    try:
        return _from_records(records, model_dir, source, "built-in")
    except ProbeError as e:
        raise ProbeError(f"no probes found: {why_not_others}, and the built-in text probes need the folder's "
                         f"tokenizer: {e}; pass --probes FILE") from None
