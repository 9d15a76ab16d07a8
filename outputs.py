"""surgery.py's output files, each of which appears whole or not at all: the merged model (from_pretrained loads
it; the sink report's probes ride in its safetensors metadata, where sinkcheck reads them) and the peft-format
adapter."""
import json
import os
import shutil

from common import make_folder_public, write_atomically, write_json

# Where the merged model's safetensors metadata carries the probes of its sink report (read by sinkcheck).
PROBES_METADATA_KEY = "sinkcheck.probes"


def save_merged_model(out, model, tokenizer, probes, state):
    """model.safetensors (+ config, tokenizer) that from_pretrained loads; the probes ride in the metadata.
    The config and tokenizer files are written in a staging folder and moved in first, the weights last: a
    folder with model.safetensors holds the whole model, whenever the writing stopped."""
    from safetensors.torch import save_file
    (out / "model.safetensors").unlink(missing_ok=True)  # a resumed run's earlier attempt: not complete until the end
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    model.config.save_pretrained(staging)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    for file in staging.iterdir():
        os.replace(file, out / file.name)
    staging.rmdir()
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    metadata = {"format": "pt", PROBES_METADATA_KEY: json.dumps(probes)}
    write_atomically(out / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_adapter(out, state, args):
    """OUT/adapter/: its own folder, because from_pretrained(OUT) with peft installed would otherwise apply an
    adapter_config.json found beside the merged weights a second time."""
    from safetensors.torch import save_file
    final, out = out / "adapter", out / ".adapter.tmp"  # written whole, then renamed into place
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(args.model),
              "r": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
              "target_modules": sorted(args.lora_targets), "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True, "modules_to_save": None}
    write_atomically(out / "adapter_model.safetensors",
                     lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    write_json(out / "adapter_config.json", config)
    make_folder_public(out)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(out, final)
