"""Bad input is rejected with the right one-line message and exit code 2: a corpus of broken safetensors headers
and offsets for the strict parser, then broken checkpoints, configs and probes through the command line."""
import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from sinkcheck import _core
from checker_helpers import run_cli, save_checker_model, write_probes

ENTRY_A = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
ENTRY_B = {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]}
ENTRY_C = {"dtype": "BF16", "shape": [2, 2], "data_offsets": [32, 40]}
DATA = bytes(range(40))


def image(header, data=DATA, header_len=None):
    """A safetensors file image: 8-byte little-endian header length, the header text, the data."""
    text = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(text) if header_len is None else header_len) + text + data


def with_field(entry, **fields):
    """A copy of the dict with each named key set, or removed where the value is None."""
    out = dict(entry)
    for key, value in fields.items():
        if value is None:
            out.pop(key)
        else:
            out[key] = value
    return out


def valid_header(**changes):
    header = {"__metadata__": {"format": "pt"}, "a": dict(ENTRY_A), "b": dict(ENTRY_B), "c": dict(ENTRY_C)}
    return with_field(header, **changes)


def deep(levels):
    return "[" * levels + "]" * levels


CORPUS = {
    "empty file": (b"", "too short"),
    "seven bytes": (b"\x01\x00\x00\x00\x00\x00\x00", "too short"),
    "header length past the end": (image(valid_header(), header_len=10_000), "runs past the end"),
    "header length absurd": (image(valid_header(), header_len=1 << 40), "exceeds the 100 MB limit"),
    "header not json": (image(b"{not json}"), "expected a string key"),
    "header is an array": (image(b"[1, 2, 3]"), "header is not a JSON object"),
    "trailing comma": (image(json.dumps(valid_header())[:-1] + ",}"), "expected a string key"),
    "data after the header json": (image(json.dumps(valid_header()) + "x"), "unexpected data after the JSON value"),
    "unterminated header": (image(json.dumps(valid_header())[:-1]), "unterminated object"),
    "duplicate tensor name": (image('{"a": %s, "a": %s}' % (json.dumps(ENTRY_A), json.dumps(ENTRY_A))),
                              "duplicate key \"a\""),
    "unknown dtype": (image(valid_header(a=with_field(ENTRY_A, dtype="F33"))), "unknown dtype 'F33'"),
    "dtype not a string": (image(valid_header(a=with_field(ENTRY_A, dtype=4))), "dtype must be a string"),
    "offset past the data area": (image(valid_header(c=with_field(ENTRY_C, data_offsets=[32, 400]))),
                                  "past the data area of 40 bytes"),
    "begin after end": (image(valid_header(a=with_field(ENTRY_A, data_offsets=[24, 0]))), "begin 24 is after end 0"),
    "length does not match shape": (image(valid_header(a=with_field(ENTRY_A, shape=[2, 4]))),
                                    "byte length 24 does not match shape [2, 4] x F32 (32 bytes)"),
    "overlapping tensors": (image(valid_header(b=with_field(ENTRY_B, data_offsets=[20, 28]))), "'a' and 'b' overlap"),
    "negative extent": (image(valid_header(a=with_field(ENTRY_A, shape=[-2, 3]))),
                        "shape entry must be a non-negative integer"),
    "shape not a list": (image(valid_header(a=with_field(ENTRY_A, shape=6))), "shape must be an array"),
    "shape overflow": (image(valid_header(a=with_field(ENTRY_A, shape=[1 << 40, 1 << 40]))), "overflows"),
    "fractional offset": (image(valid_header(a=with_field(ENTRY_A, data_offsets=[0.5, 24]))),
                          "data_offsets begin must be a non-negative integer"),
    "three offsets": (image(valid_header(a=with_field(ENTRY_A, data_offsets=[0, 12, 24]))),
                      "data_offsets must be [begin, end]"),
    "missing offsets": (image(valid_header(a=with_field(ENTRY_A, data_offsets=None))),
                        "needs dtype, shape and data_offsets"),
    "unknown entry field": (image(valid_header(a=with_field(ENTRY_A, strides=[3, 1]))), "unknown header field 'strides'"),
    "entry not an object": (image(valid_header(a=[1, 2])), "header entry is not an object"),
    "metadata value not a string": (image(valid_header(__metadata__={"format": 1})),
                                    "__metadata__ value for 'format' is not a string"),
    "truncated data": (image(valid_header(), data=DATA[:30]), "past the data area of 30 bytes (truncated file?)"),
    "invalid utf-8": (image(b'{"\xff": ' + json.dumps(ENTRY_A).encode() + b"}"), "invalid UTF-8"),
    "overlong utf-8": (image(b'{"\xc0\xaf": ' + json.dumps(ENTRY_A).encode() + b"}"), "invalid UTF-8"),
    "lone surrogate escape": (image('{"\\ud800": %s}' % json.dumps(ENTRY_A)), "unpaired surrogate"),
    "control character": (image('{"a\tb": %s}' % json.dumps(ENTRY_A)), "control character in string"),
    "leading zero": (image(json.dumps(valid_header()).replace("[0, 24]", "[00, 24]")), "leading zero"),
    "NaN offset": (image(json.dumps(valid_header()).replace("[0, 24]", "[NaN, 24]")), "unexpected character"),
    "deep nesting": (image('{"__metadata__": {"x": %s}}' % deep(100)), "nesting deeper than 64"),
}


@pytest.mark.parametrize("name", CORPUS)
def test_parser_rejects_broken_file(name):
    data, message = CORPUS[name]
    with pytest.raises(_core.CheckError, match=None) as caught:
        _core.check_safetensors(data)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_parser_accepts_the_valid_base():
    assert _core.check_safetensors(image(valid_header())) == 3
    # Header padded with trailing spaces (writers align the data area) and empty tensors are fine.
    padded = json.dumps(valid_header(e={"dtype": "F32", "shape": [0, 3], "data_offsets": [40, 40]})) + "    "
    assert _core.check_safetensors(image(padded)) == 4


# ---------------------------------------------------------------------------------------------------------------
# Through the command line: exit 2, one line on stderr, no traceback, no output file.
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    folder = save_checker_model(root / "good", "llama", seed=1)
    probes = write_probes(root / "probes.json", [[257, 1, 2, 3]], [[257, 4, 5, 6]])
    return {"root": root, "folder": folder, "probes": probes}


def variant(base, name, tensors=None, config=None, remove=()):
    """A copy of the good folder with its tensors and/or config.json changed."""
    folder = base["root"] / name
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(base["folder"], folder)
    if tensors is not None:
        state = load_file(str(folder / "model.safetensors"))
        tensors(state)
        save_file(state, str(folder / "model.safetensors"))
    if config is not None:
        doc = json.loads((folder / "config.json").read_text())
        config(doc)
        (folder / "config.json").write_text(json.dumps(doc))
    for file in remove:
        (folder / file).unlink()
    return folder


def expect_bad_input(*args, message):
    out = args[0].parent / "never.json" if hasattr(args[0], "parent") else None
    extra = ("--json", out) if out is not None else ()
    done = run_cli(*args, *extra)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 or (len(lines) == 2 and lines[0].startswith("probes: ")), done.stderr
    assert lines[-1].startswith("sinkcheck: error: ") and message in lines[-1], done.stderr
    assert "Traceback" not in done.stderr
    if out is not None:
        assert not out.exists()


def drop(name):
    return lambda state: state.pop(name)


def reshape(name):
    return lambda state: state.__setitem__(name, state[name][:, :-1].contiguous())


def retype(name, dtype):
    return lambda state: state.__setitem__(name, state[name].to(dtype))


def poke(name, index, value):
    """Sets one element of a tensor (a NaN, an infinity) in place."""
    def change(state):
        state[name][index] = value
    return change


def scale(*names, by):
    def change(state):
        for name in names:
            state[name].mul_(by)
    return change


def set_field(**fields):
    return lambda doc: doc.update(fields)


CHECKPOINT_CASES = {
    "missing tensor": (dict(tensors=drop("model.layers.1.mlp.up_proj.weight")),
                       "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    "wrong shape": (dict(tensors=reshape("model.layers.0.self_attn.k_proj.weight")),
                    "'model.layers.0.self_attn.k_proj.weight' has shape [32, 63] but config.json implies [32, 64]"),
    "unsupported dtype": (dict(tensors=retype("model.layers.0.self_attn.q_proj.weight", torch.float64)),
                          "has unsupported dtype F64 (sinkcheck reads F32, F16 and BF16)"),
    "integer weights": (dict(tensors=retype("model.embed_tokens.weight", torch.int32)), "has unsupported dtype I32"),
    "unsupported architecture": (dict(config=set_field(model_type="gpt2", architectures=["GPT2LMHeadModel"])),
                                 "unsupported architecture 'GPT2LMHeadModel'"),
    "unsupported rope": (dict(config=set_field(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})),
                         "unsupported rope type 'yarn'"),
    "unsupported activation": (dict(config=set_field(hidden_act="gelu")), "unsupported hidden_act 'gelu'"),
    "config missing a size": (dict(config=lambda doc: doc.pop("hidden_size")), "missing 'hidden_size'"),
    # Found by the fuzz run: a per-layer array of this length would take gigabytes.
    "absurd layer count": (dict(config=set_field(num_hidden_layers=911111112)),
                           "'num_hidden_layers' must be a positive integer up to 65536"),
    "absurd head size": (dict(config=set_field(head_dim=1 << 29)), "'head_dim' must be a positive integer up to 65536"),
    "no config.json": (dict(remove=["config.json"]), "no config.json beside the weights"),
    # Non-finite weights stop the audit, naming the tensor and the element (the probes use token 257).
    "NaN weight": (dict(tensors=poke("model.layers.1.self_attn.q_proj.weight", (3, 5), float("nan"))),
                   "tensor 'model.layers.1.self_attn.q_proj.weight' holds a non-finite value (NaN) at [3, 5]"),
    "infinite MLP weight": (dict(tensors=poke("model.layers.0.mlp.down_proj.weight", (63, 127), float("-inf"))),
                            "tensor 'model.layers.0.mlp.down_proj.weight' holds a non-finite value (-inf) at [63, 127]"),
    "NaN norm weight": (dict(tensors=poke("model.layers.0.input_layernorm.weight", (10,), float("nan"))),
                        "tensor 'model.layers.0.input_layernorm.weight' holds a non-finite value (NaN) at [10]"),
    "infinite embedding row in use": (dict(tensors=poke("model.embed_tokens.weight", (257, 7), float("inf"))),
                                      "tensor 'model.embed_tokens.weight' holds a non-finite value (+inf) at [257, 7]"),
    # Finite weights whose activations overflow fp32 (gate x up ~ 1e60): named by layer.
    "overflowing activations": (dict(tensors=scale("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
                                                   by=1e30)),
                                "layer 0: the hidden state became non-finite although every weight read so far is finite"),
    "no weights": (dict(remove=["model.safetensors"]), "no .safetensors files in folder"),
}


@pytest.mark.parametrize("name", CHECKPOINT_CASES)
def test_cli_rejects_bad_checkpoint(base, name):
    changes, message = CHECKPOINT_CASES[name]
    folder = variant(base, name.replace(" ", "_"), **changes)
    expect_bad_input(folder, "--probes", base["probes"], message=message)


# The new families' fields: each case changes a good 3-layer model of the family (tiny.py's Gemma 3 has local layers
# 0 and 2 and global layer 1; Phi-3 is given longrope with original_max_position_embeddings 16 and rotary dims
# 12 of 16) and must be refused with its own message, never computed some other way.
PHI3_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                 "short_factor": [1.0] * 6, "long_factor": [4.0] * 6}
FAMILY_BASES = {"qwen3": {}, "gemma3": {}, "olmo2": {},
                "phi3": dict(rope_parameters=PHI3_LONGROPE, original_max_position_embeddings=16)}


def set_rope(**fields):
    return lambda doc: doc["rope_parameters"].update(fields)


def set_gemma3_rope(layer_type, **fields):
    return lambda doc: doc["rope_parameters"][layer_type].update(fields)


FAMILY_CASES = {
    # Gemma 3
    "gemma3 multimodal": ("gemma3", dict(config=set_field(model_type="gemma3",
                                                          architectures=["Gemma3ForConditionalGeneration"])),
                          "model_type 'gemma3' is the multimodal Gemma 3 (Gemma3ForConditionalGeneration)"),
    "gemma3 soft-capping": ("gemma3", dict(config=set_field(attn_logit_softcapping=50.0)),
                            "'attn_logit_softcapping' is set; sinkcheck does not implement soft-capped attention"),
    "gemma3 bidirectional": ("gemma3", dict(config=set_field(use_bidirectional_attention=True)),
                             "'use_bidirectional_attention' is set; sinkcheck implements causal attention only"),
    "gemma3 activation": ("gemma3", dict(config=set_field(hidden_activation="gelu")),
                          "unsupported hidden_activation 'gelu'"),
    "gemma3 query scalar": ("gemma3", dict(config=set_field(query_pre_attn_scalar=-4)),
                            "'query_pre_attn_scalar' must be a positive number"),
    "gemma3 layer type": ("gemma3", dict(config=set_field(layer_types=["sliding_attention", "chunked_attention",
                                                                       "full_attention"])),
                          "layer_types[1] is 'chunked_attention' (sinkcheck implements full_attention and "
                          "sliding_attention)"),
    "gemma3 layer count": ("gemma3", dict(config=set_field(layer_types=["sliding_attention", "full_attention"])),
                           "layer_types must list one type per layer"),
    "gemma3 no window": ("gemma3", dict(config=set_field(sliding_window=None)),
                         "sliding_window is null but layer 0 is a sliding_attention layer"),
    "gemma3 flat rope": ("gemma3", dict(config=set_field(rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
                         "rope_parameters must be keyed by layer type (full_attention, sliding_attention)"),
    "gemma3 global rope type": ("gemma3", dict(config=set_gemma3_rope("full_attention", rope_type="yarn", factor=2.0)),
                                "(full_attention layers): unsupported rope type 'yarn'"),
    "gemma3 local rope partial": ("gemma3",
                                  dict(config=set_gemma3_rope("sliding_attention", partial_rotary_factor=0.5)),
                                  "partial_rotary_factor other than 1 is not supported for this family"),
    "gemma3 missing norm": ("gemma3", dict(tensors=drop("model.layers.1.pre_feedforward_layernorm.weight")),
                            "missing tensor 'model.layers.1.pre_feedforward_layernorm.weight'"),
    "gemma3 NaN post-norm": ("gemma3", dict(tensors=poke("model.layers.0.post_feedforward_layernorm.weight", (9,),
                                                         float("nan"))),
                             "'model.layers.0.post_feedforward_layernorm.weight' holds a non-finite value (NaN) "
                             "at [9]"),
    # Qwen3
    "qwen3 q_norm missing": ("qwen3", dict(tensors=drop("model.layers.2.self_attn.q_norm.weight")),
                             "missing tensor 'model.layers.2.self_attn.q_norm.weight'"),
    "qwen3 k_norm over the projection": ("qwen3", dict(tensors=lambda state: state.__setitem__(
        "model.layers.0.self_attn.k_norm.weight", torch.ones(32))),
        "'model.layers.0.self_attn.k_norm.weight' has shape [32] but config.json implies [16]"),
    "qwen3 bias without tensors": ("qwen3", dict(config=set_field(attention_bias=True)),
                                   "missing tensor 'model.layers.0.self_attn.q_proj.bias'"),
    "qwen3 partial rotary": ("qwen3", dict(config=set_rope(partial_rotary_factor=0.5)),
                             "partial_rotary_factor other than 1 is not supported for this family"),
    "qwen3 rope by layer type": ("qwen3",
                                 dict(config=set_field(rope_parameters={"full_attention": {"rope_theta": 1e4}})),
                                 "rope parameters keyed by layer type, but this family has one rotary embedding"),
    "qwen3 window layer type": ("qwen3", dict(config=set_field(use_sliding_window=True,
                                                               layer_types=["full_attention", 3, "full_attention"])),
                                "layer_types[1] is not a string"),
    # Phi-3
    "phi3 fused qkv shape": ("phi3", dict(tensors=lambda state: state.__setitem__(
        "model.layers.1.self_attn.qkv_proj.weight", state["model.layers.1.self_attn.qkv_proj.weight"][:96].clone())),
        "'model.layers.1.self_attn.qkv_proj.weight' has shape [96, 64] but config.json implies [128, 64]"),
    "phi3 fused gate_up missing": ("phi3", dict(tensors=drop("model.layers.0.mlp.gate_up_proj.weight")),
                                   "missing tensor 'model.layers.0.mlp.gate_up_proj.weight'"),
    # The v rows of layer 0's fused projection: a NaN there is found, and named in the fused tensor.
    "phi3 NaN in fused v": ("phi3", dict(tensors=poke("model.layers.0.self_attn.qkv_proj.weight", (100, 3),
                                                      float("nan"))),
                            "'model.layers.0.self_attn.qkv_proj.weight' holds a non-finite value (NaN) at [100, 3]"),
    "phi3 odd rotary dims": ("phi3", dict(config=set_rope(partial_rotary_factor=0.2)),
                             "head_dim x partial_rotary_factor must be a positive even number"),
    "phi3 rotary factor above 1": ("phi3", dict(config=set_rope(partial_rotary_factor=1.5)),
                                   "partial_rotary_factor must be in (0, 1]"),
    "phi3 short factors": ("phi3", dict(config=set_rope(short_factor=[1.0] * 8)),
                           "longrope 'short_factor' must be a list of 6 numbers (rotary dims / 2)"),
    "phi3 no long factors": ("phi3", dict(config=lambda doc: doc["rope_parameters"].pop("long_factor")),
                             "longrope 'long_factor' must be a list of 6 numbers"),
    "phi3 dynamic rope": ("phi3", dict(config=set_rope(rope_type="dynamic", factor=2.0)),
                          "unsupported rope type 'dynamic' (sinkcheck supports default, linear, llama3 and longrope)"),
    "phi3 activation": ("phi3", dict(config=set_field(hidden_act="relu")), "unsupported hidden_act 'relu'"),
    # OLMo 2
    "olmo2 per-head k_norm": ("olmo2", dict(tensors=lambda state: state.__setitem__(
        "model.layers.0.self_attn.k_norm.weight", torch.ones(16))),
        "'model.layers.0.self_attn.k_norm.weight' has shape [16] but config.json implies [32]"),
    "olmo2 missing post-norm": ("olmo2", dict(tensors=drop("model.layers.1.post_feedforward_layernorm.weight")),
                                "missing tensor 'model.layers.1.post_feedforward_layernorm.weight'"),
    "olmo2 rope type": ("olmo2", dict(config=set_rope(rope_type="yarn", factor=4.0)), "unsupported rope type 'yarn'"),
}


@pytest.fixture(scope="module")
def family_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_families")
    probes = write_probes(root / "probes.json", [[257, 1, 2, 3]], [[257, 4, 5, 6]])
    return {family: {"root": root, "probes": probes,
                     "folder": save_checker_model(root / f"good_{family}", family, seed=1, num_hidden_layers=3,
                                                  **overrides)}
            for family, overrides in FAMILY_BASES.items()}


def test_family_bases_are_good(family_bases):
    for family, base in family_bases.items():
        done = run_cli(base["folder"], "--probes", base["probes"])
        assert done.returncode == 0, (family, done.stderr)


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_cli_rejects_bad_family_checkpoint(family_bases, name):
    family, changes, message = FAMILY_CASES[name]
    base = family_bases[family]
    folder = variant(base, name.replace(" ", "_"), **changes)
    expect_bad_input(folder, "--probes", base["probes"], message=message)


def test_longrope_refuses_probes_past_its_original_length(family_bases):
    """Phi-3's longrope switches to its long factors past original_max_position_embeddings (16 here), for a whole
    batch at once in transformers: such probes are refused, not computed with either set of factors."""
    base = family_bases["phi3"]
    long_probes = write_probes(base["root"] / "long.json", [[257] + list(range(1, 17))], [[257, 4, 5, 6]])
    expect_bad_input(base["folder"], "--probes", long_probes,
                     message="harmful sequence 0 has 17 tokens, more than this model's longrope "
                             "original_max_position_embeddings (16)")


def test_nan_checkpoint_does_not_pass_the_gate(base):
    """Before: the NaN heads were not counted as positive, so --max-positive passed (exit 0) and --json held NaN."""
    folder = variant(base, "nan_gate", tensors=poke("model.layers.0.self_attn.k_proj.weight", (0, 0), float("nan")))
    expect_bad_input(folder, "--probes", base["probes"], "--max-positive", "1000",
                     message="'model.layers.0.self_attn.k_proj.weight' holds a non-finite value (NaN) at [0, 0]")
    # The same checkpoint as --compare's: the gate applies to PATH, but a broken OTHER is still bad input.
    done = run_cli(base["folder"], "--probes", base["probes"], "--compare", folder, "--json", base["root"] / "cmp.json")
    assert done.returncode == 2 and done.stdout == "" and not (base["root"] / "cmp.json").exists()
    assert done.stderr.count("\n") == 1 and "'model.layers.0.self_attn.k_proj.weight' holds a non-finite" in done.stderr
    # A NaN in a tensor the statistic never reads (the last layer's MLP) used to change nothing: the audit ran and
    # passed the gate. Now it is refused like any other (the next section), as --compare's checkpoint too, before
    # PATH's audit computes.
    unused = variant(base, "nan_unused", tensors=poke("model.layers.1.mlp.up_proj.weight", (0, 0), float("nan")))
    expect_bad_input(unused, "--probes", base["probes"], "--max-positive", "1000",
                     message="tensor 'model.layers.1.mlp.up_proj.weight' holds a non-finite value (NaN) at [0, 0]")
    done = run_cli(base["folder"], "--probes", base["probes"], "--compare", unused, "--json", base["root"] / "cmp.json")
    assert done.returncode == 2 and done.stdout == "" and not (base["root"] / "cmp.json").exists()
    assert done.stderr.count("\n") == 1 and "'model.layers.1.mlp.up_proj.weight' holds a non-finite" in done.stderr


# ---------------------------------------------------------------------------------------------------------------
# One rule for non-finite values: a NaN or infinity in any floating-point tensor of the checkpoint is refused,
# read by the statistic or not (surgery.py's rule for what it writes and resumes from), whatever its dtype and
# shard. Integer and bool tensors hold no NaN: their bits are never read as floats.
# ---------------------------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def add(name, tensor):
    """A tensor the config does not name (a checkpoint may carry any)."""
    return lambda state: state.__setitem__(name, tensor)


def stored(dtype, *bits):
    """A 1-D tensor of `dtype` holding exactly these stored bytes (float8 values are given by their bits)."""
    return torch.tensor(bits, dtype=torch.uint8).view(dtype)


def holding(dtype, value, index=(1, 2), shape=(2, 3)):
    """A tensor of `dtype` (shape [2, 3] unless given), zeros but `value` at `index`."""
    tensor = torch.zeros(shape)
    tensor[index] = value
    return tensor.to(dtype)


NOT_READ = "tensor '{}' holds a non-finite value ({}) at {}"
UNREAD_CASES = {
    # Tensors the statistic does not read: the last layer's value, output and MLP weights, the final norm, the
    # embedding rows no probe uses (the probes use tokens 1-6 and 257).
    "NaN in the last layer's MLP": (poke("model.layers.1.mlp.down_proj.weight", (7, 100), NAN),
                                    NOT_READ.format("model.layers.1.mlp.down_proj.weight", "NaN", "[7, 100]")),
    "+inf in the last layer's value projection": (poke("model.layers.1.self_attn.v_proj.weight", (5, 9), INF),
                                                  NOT_READ.format("model.layers.1.self_attn.v_proj.weight", "+inf",
                                                                  "[5, 9]")),
    "-inf in the last layer's output projection": (poke("model.layers.1.self_attn.o_proj.weight", (0, 63), -INF),
                                                   NOT_READ.format("model.layers.1.self_attn.o_proj.weight", "-inf",
                                                                   "[0, 63]")),
    "NaN in the final norm": (poke("model.norm.weight", (3,), NAN), NOT_READ.format("model.norm.weight", "NaN", "[3]")),
    "-inf in an embedding row no probe uses": (poke("model.embed_tokens.weight", (12, 0), -INF),
                                               NOT_READ.format("model.embed_tokens.weight", "-inf", "[12, 0]")),
    # An LM head beside the tied embeddings (untied models store one; this tiny Llama ties them).
    "NaN in an LM head": (add("lm_head.weight", holding(torch.float32, NAN, (200, 5), shape=(259, 64))),
                          NOT_READ.format("lm_head.weight", "NaN", "[200, 5]")),
    # A tensor the config does not name, in every floating-point dtype the parser accepts.
    "F32 NaN": (add("extra.weight", holding(torch.float32, NAN)), NOT_READ.format("extra.weight", "NaN", "[1, 2]")),
    "F32 +inf": (add("extra.weight", holding(torch.float32, INF)), NOT_READ.format("extra.weight", "+inf", "[1, 2]")),
    "F16 NaN": (add("extra.weight", holding(torch.float16, NAN)), NOT_READ.format("extra.weight", "NaN", "[1, 2]")),
    "F16 -inf": (add("extra.weight", holding(torch.float16, -INF)), NOT_READ.format("extra.weight", "-inf", "[1, 2]")),
    "BF16 NaN": (add("extra.weight", holding(torch.bfloat16, NAN)), NOT_READ.format("extra.weight", "NaN", "[1, 2]")),
    "BF16 +inf": (add("extra.weight", holding(torch.bfloat16, INF)), NOT_READ.format("extra.weight", "+inf", "[1, 2]")),
    "F64 NaN": (add("extra.weight", holding(torch.float64, NAN)), NOT_READ.format("extra.weight", "NaN", "[1, 2]")),
    "F64 -inf": (add("extra.weight", holding(torch.float64, -INF)), NOT_READ.format("extra.weight", "-inf", "[1, 2]")),
    # float8 by its bits: E5M2 has IEEE infinities (S.11111.00) and NaNs; E4M3 (fn) has no infinity, S.1111.111 is NaN.
    "F8_E5M2 NaN": (add("extra.weight", stored(torch.float8_e5m2, 0x3C, 0x00, 0xFE, 0x01)),
                    NOT_READ.format("extra.weight", "NaN", "[2]")),
    "F8_E5M2 +inf": (add("extra.weight", stored(torch.float8_e5m2, 0x3C, 0x7C, 0x00)),
                     NOT_READ.format("extra.weight", "+inf", "[1]")),
    "F8_E5M2 -inf": (add("extra.weight", stored(torch.float8_e5m2, 0xFC)), NOT_READ.format("extra.weight", "-inf", "[0]")),
    "F8_E4M3 NaN": (add("extra.weight", stored(torch.float8_e4m3fn, 0x7E, 0x00, 0x7F)),
                    NOT_READ.format("extra.weight", "NaN", "[2]")),
    "F8_E4M3 negative NaN": (add("extra.weight", stored(torch.float8_e4m3fn, 0xFE, 0xFF)),
                             NOT_READ.format("extra.weight", "NaN", "[1]")),
    "scalar NaN": (add("extra.scale", torch.tensor(NAN)), NOT_READ.format("extra.scale", "NaN", "[]")),
}


@pytest.mark.parametrize("name", UNREAD_CASES)
def test_cli_rejects_non_finite_value_in_any_float_tensor(base, name):
    change, message = UNREAD_CASES[name]
    folder = variant(base, "unread_" + name.replace(" ", "_").replace("'", ""), tensors=change)
    expect_bad_input(folder, "--probes", base["probes"], "--max-positive", "1000", message=message)


def test_finite_extremes_and_integer_tensors_pass(base):
    """The largest, smallest and subnormal finite values of every float dtype, and integer and bool tensors whose
    bits would be NaN or infinity as floats: a clean checkpoint, audited to the same result as without them."""
    def extremes(state):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            info = torch.finfo(dtype)
            state[f"extra.{dtype}".replace("torch.", "")] = torch.tensor(
                [info.max, -info.max, info.tiny, info.smallest_normal / 4, -0.0], dtype=dtype)
        state["extra.e5m2"] = stored(torch.float8_e5m2, 0x7B, 0xFB, 0x01, 0x80)  # +-57344, the smallest subnormal, -0
        state["extra.e4m3"] = stored(torch.float8_e4m3fn, 0x7E, 0xFE, 0x01, 0x80)  # +-448, the smallest subnormal, -0
        state["extra.i32"] = torch.tensor([0x7FC00000, 0x7F800000, -1], dtype=torch.int32)
        state["extra.i64"] = torch.tensor([0x7FF8000000000000, -1], dtype=torch.int64)
        state["extra.i16"] = torch.tensor([0x7C00, 0x7F80, -1], dtype=torch.int16)
        state["extra.u8"] = torch.tensor([0x7F, 0xFF, 0x7C], dtype=torch.uint8)
        state["extra.i8"] = torch.tensor([0x7F, -1], dtype=torch.int8)
        state["extra.bool"] = torch.tensor([True, False])
    folder = variant(base, "finite_extremes", tensors=extremes)
    outputs = []
    for checkpoint in (base["folder"], folder):
        out = base["root"] / f"{checkpoint.name}.json"
        done = run_cli(checkpoint, "--probes", base["probes"], "--json", out)
        assert done.returncode == 0, done.stderr
        outputs.append(json.loads(out.read_text())["divergence"])
    assert outputs[0] == outputs[1]


def shard(folder, first_names):
    """Splits the folder's model.safetensors into two shards and an index, the tensors in first_names first."""
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    parts = [{k: v for k, v in state.items() if k in first_names}, {k: v for k, v in state.items() if k not in first_names}]
    for file, part in zip(names, parts):
        save_file(part, str(folder / file))
    weight_map = {k: names[0] if k in first_names else names[1] for k in state}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_sharded_checkpoint_nan_in_the_second_shard(base):
    """Every shard is read: the NaN is found in the second, and named with that shard's file."""
    first = {"model.embed_tokens.weight"} | {k for k in load_file(str(base["folder"] / "model.safetensors"))
                                             if k.startswith("model.layers.0.")}
    clean = shard(variant(base, "sharded_clean"), first)
    done = run_cli(clean, "--probes", base["probes"], "--json", base["root"] / "sharded.json")
    assert done.returncode == 0, done.stderr
    broken = shard(variant(base, "sharded_nan", tensors=poke("model.layers.1.mlp.gate_proj.weight", (127, 1), NAN)),
                   first)
    expect_bad_input(broken, "--probes", base["probes"],
                     message="model-00002-of-00002.safetensors: tensor 'model.layers.1.mlp.gate_proj.weight' holds a "
                             "non-finite value (NaN) at [127, 1]")
    # The index itself as PATH finds it too.
    expect_bad_input(broken / "model.safetensors.index.json", "--probes", base["probes"],
                     message="tensor 'model.layers.1.mlp.gate_proj.weight' holds a non-finite value (NaN) at [127, 1]")


def test_first_non_finite_in_file_order_whatever_the_threads(base):
    """A tensor of several 4 MB chunks with bad values in its second and third: the first in file order is named,
    on one thread or many (chunks finish in any order), and the element index is counted across chunks."""
    big = torch.zeros(3000, 1000)
    big[2500, 7] = NAN   # third chunk of 1,048,576 floats
    big[1500, 3] = -INF  # second chunk
    folder = variant(base, "big_chunks", tensors=add("extra.big", big))
    for threads in ("1", "4"):
        expect_bad_input(folder, "--probes", base["probes"], "--threads", threads,
                         message="tensor 'extra.big' holds a non-finite value (-inf) at [1500, 3]")


def test_model_refuses_before_any_result(base):
    """The C++ entry points check too, not only the command line: check_finite() names the value, and an audit
    through the module refuses the checkpoint before computing."""
    folder = variant(base, "api_nan", tensors=add("lm_head.weight", holding(torch.bfloat16, NAN, (0, 1))))
    model = _core.Model(str(folder), threads=2)
    message = "tensor 'lm_head.weight' holds a non-finite value (NaN) at [0, 1]"
    with pytest.raises(_core.CheckError, match=None) as caught:
        model.check_finite()
    assert message in str(caught.value)
    for call in (lambda: model.mean_sink_values([[257, 1, 2, 3]]),
                 lambda: model.sink_divergence([[257, 1, 2, 3]], [[257, 4, 5, 6]])):
        with pytest.raises(_core.CheckError) as caught:
            call()
        assert message in str(caught.value)
    good = _core.Model(str(base["folder"]), threads=2)
    good.check_finite()
    good.check_finite()  # once per model: the second call returns at once


def test_cli_rejects_truncated_and_missing_files(base):
    folder = variant(base, "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    expect_bad_input(weights, "--probes", base["probes"], message="(truncated file?)")
    expect_bad_input(base["root"] / "nowhere", "--probes", base["probes"], message="no such file or folder")
    shards = variant(base, "bad_index")
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "missing.safetensors"}}))
    expect_bad_input(shards, "--probes", base["probes"], message="cannot open")
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../model.safetensors"}}))
    expect_bad_input(shards, "--probes", base["probes"], message="must be a plain file name")


def weights_and_config_only(base, name):
    """A copy of the good folder without its tokenizer files: no text probes can be tokenized for it."""
    folder = variant(base, name)
    for file in folder.iterdir():
        if file.name not in ("model.safetensors", "config.json"):
            file.unlink()
    return folder


def test_cli_rejects_bad_probes(base):
    folder, root = base["folder"], base["root"]
    # No metadata, no --probes, and no tokenizer for the built-in text probes.
    expect_bad_input(weights_and_config_only(base, "no_tokenizer"),
                     message="no probes found: ")
    expect_bad_input(weights_and_config_only(base, "no_tokenizer"),
                     message="the built-in text probes need the folder's tokenizer")
    expect_bad_input(folder, "--probes", root / "absent.json", message="cannot read probes file")
    (root / "list.json").write_text("[1, 2]")
    expect_bad_input(folder, "--probes", root / "list.json", message="line 1 needs string fields")
    (root / "strings.json").write_text(json.dumps({"harmful": [["a"]], "harmless": [[1, 2]]}))
    expect_bad_input(folder, "--probes", root / "strings.json", message="'harmful' sequence 0 is not a list")
    big = write_probes(root / "big.json", [[257, 5000]], [[257, 1]])
    expect_bad_input(folder, "--probes", big, message="probe token id 5000 in harmful sequence 0 is outside the vocabulary")
    short = write_probes(root / "short.json", [[257, 1, 2]], [[257, 1]], sink=1)
    expect_bad_input(folder, "--probes", short, message="no probes: the harmless set has no sequence longer than")
    one_sided = root / "one_sided.jsonl"
    one_sided.write_text(json.dumps({"instruction": "a", "output": "b", "harmful": True}) + "\n")
    expect_bad_input(folder, "--probes", one_sided, message="needs at least one record with \"harmful\": true and one")

    # Probes in the metadata that are not JSON.
    meta = variant(base, "bad_metadata")
    state = load_file(str(meta / "model.safetensors"))
    save_file(state, str(meta / "model.safetensors"), metadata={"sinkcheck.probes": "{harmful"})
    expect_bad_input(meta, message="metadata 'sinkcheck.probes'): not valid JSON")


def test_cli_rejects_bad_flags(base):
    expect_bad_input(base["folder"], "--max-positive", "lots", message="invalid int value: 'lots'")
    expect_bad_input(base["folder"], "--probes", base["probes"], "--max-positive", "-1",
                     message="--max-positive must be between 0 and")
    done = run_cli(base["folder"], "--probes", base["probes"], "--json", base["root"] / "no_dir" / "out.json")
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr
