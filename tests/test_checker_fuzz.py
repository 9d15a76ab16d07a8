"""A bounded fuzz run of the checker's parsers: atheris mutates a seed corpus (valid and broken safetensors
images, a config.json) through the extension for FUZZ_SECONDS, then every input it kept is replayed through the
same parsers built with AddressSanitizer and UndefinedBehaviorSanitizer. No crash, no sanitizer report."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_checker_malformed import CORPUS, image, valid_header

ROOT = Path(__file__).resolve().parents[1]
FUZZ_SECONDS = int(os.environ.get("SINKCHECK_FUZZ_SECONDS", "30"))
PARSER_SOURCES = ["fuzz/fuzz_target.cc", "fuzz/replay_main.cc", "json.cc", "safetensors.cc", "config.cc", "rope.cc"]

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "vocab_size": 259, "rms_norm_eps": 1e-6, "hidden_act": "silu",
          "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}


# One config per family whose fields differ: Gemma 3 (layer types, per-type RoPE, scalings), Phi-3 (longrope with
# partial rotary), Qwen3 (sliding layers), OLMo 2.
SIZES = {k: CONFIG[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps")}
FAMILY_CONFIGS = {
    "gemma3": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **SIZES,
               "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256, "sliding_window": 512,
               "layer_types": ["sliding_attention", "full_attention"], "attn_logit_softcapping": None,
               "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "phi3": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", **SIZES, "sliding_window": 2047,
             "original_max_position_embeddings": 4096, "max_position_embeddings": 131072,
             "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.75,
                                 "short_factor": [1.0] * 6, "long_factor": [2.0] * 6}},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **SIZES, "use_sliding_window": True,
              "sliding_window": 64, "layer_types": ["full_attention", "sliding_attention"], "attention_bias": True},
    "olmo2": {"architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", **SIZES,
              "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
}


def seed_corpus(folder):
    folder.mkdir()
    (folder / "valid.safetensors").write_bytes(image(valid_header()))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    for family, config in FAMILY_CONFIGS.items():
        (folder / f"config_{family}.json").write_text(json.dumps(config))
    for k, (data, _) in enumerate(CORPUS.values()):
        (folder / f"broken_{k}").write_bytes(data)


def test_fuzz_parsers(tmp_path):
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    seed_corpus(corpus)

    # Build the sanitizer replay binary while atheris runs.
    compiler = shutil.which("g++") or shutil.which("c++")
    assert compiler, "a C++ compiler is needed (it also builds the extension)"
    binary = tmp_path / "replay"
    build = subprocess.Popen([compiler, "-std=c++17", "-O0", "-g", "-fsanitize=address,undefined",
                              "-fno-sanitize-recover=all", f"-I{ROOT / 'checker'}",
                              *[str(ROOT / "checker" / s) for s in PARSER_SOURCES], "-o", str(binary)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    fuzz = subprocess.run([sys.executable, str(ROOT / "checker" / "fuzz" / "fuzz_parsers.py"),
                           f"-max_total_time={FUZZ_SECONDS}", "-max_len=4096", "-timeout=10", "-rss_limit_mb=2048",
                           str(corpus)], capture_output=True, text=True, timeout=FUZZ_SECONDS + 120)
    log = fuzz.stdout + fuzz.stderr
    assert fuzz.returncode == 0, log[-3000:]
    runs = re.search(r"Done (\d+) runs", log)
    assert runs and int(runs.group(1)) > 1000, log[-3000:]

    build_log = build.communicate(timeout=300)[0]
    assert build.returncode == 0, build_log[-3000:]
    replay = subprocess.run([str(binary), str(corpus)], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
                                     UBSAN_OPTIONS="print_stacktrace=1"))
    assert replay.returncode == 0, (replay.stdout + replay.stderr)[-3000:]
    replayed = int(re.search(r"replayed (\d+) inputs", replay.stdout).group(1))
    assert replayed >= len(CORPUS) + 2 + len(FAMILY_CONFIGS)


def test_family_seed_configs_are_valid():
    """The seeds start the fuzzer from configs that parse: every family's fields are reached."""
    from sinkcheck import _core
    for family, config in FAMILY_CONFIGS.items():
        assert _core.check_config(json.dumps(config).encode())["family"] in (family, "gemma3_text")
