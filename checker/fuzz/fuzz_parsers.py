"""Fuzz the checker's strict parsers (safetensors header, JSON, config.json) with atheris.

    python checker/fuzz/fuzz_parsers.py -max_total_time=60 CORPUS_DIR

Every input must either parse or raise CheckError; any other exception, a crash or a hang is a
finding. The C++ code is not coverage-instrumented (that needs clang); to still steer the
mutator, each distinct rejection reason is a separate Python branch that atheris sees.
"""
import re
import sys

import atheris

with atheris.instrument_imports():
    from sinkcheck import _core

# One entry per rejection reason; new reasons reached count as new coverage.
REASONS = ["too short", "runs past the end", "100 MB limit", "not a JSON object", "unexpected end", "unexpected character",
           "invalid literal", "expected a string key", "duplicate key", "expected ':'", "unterminated", "expected ','",
           "truncated \\u", "invalid \\u", "surrogate", "invalid UTF-8", "truncated UTF-8", "control character",
           "invalid escape", "leading zero", "invalid number", "out of range", "nesting deeper", "unexpected data",
           "header entry is not an object", "unknown header field", "needs dtype", "dtype must be", "unknown dtype",
           "shape must be", "shape entry", "overflows", "data_offsets must", "data_offsets begin", "is after end",
           "past the data area", "does not match shape", "overlap", "empty name", "__metadata__", "unsupported architecture",
           "missing '", "positive integer", "rope", "hidden_act", "layer_types", "must be", "longrope",
           "partial_rotary_factor", "hidden_activation", "is set;", "sliding_window", "multimodal", "keyed by layer type"]


@atheris.instrument_func
def note_reason(message):
    for index, reason in enumerate(REASONS):
        if reason in message:
            return index
    return -1


@atheris.instrument_func
def test_one_input(data):
    for check in (_core.check_safetensors, _core.check_json, _core.check_config):
        try:
            check(data)
        except _core.CheckError as e:
            if note_reason(str(e)) < 0 and not re.search(r"\S", str(e)):
                raise AssertionError("empty CheckError message")


def main():
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
