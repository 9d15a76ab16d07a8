#include "config.h"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "errors.h"
#include "rope.h"

namespace sinkcheck {

namespace {

// Sizes that set the length of a per-layer or per-frequency array are capped, so a damaged config.json fails
// here with a message instead of asking for gigabytes; real models are orders of magnitude below the caps.
constexpr long long kMaxSize = 1 << 30;
constexpr long long kMaxLayersOrHeadDim = 1 << 16;

int int_field(const Json& doc, const char* key, const std::string& label, int fallback = -1,
              long long max = kMaxSize) {
  const Json* value = doc.find(key);
  if (!value || value->is_null()) {
    if (fallback >= 0) return fallback;
    throw CheckError(label + ": missing '" + key + "'");
  }
  if (!value->is_number() || !value->is_integer || value->integer <= 0 || value->integer > max)
    throw CheckError(label + ": '" + key + "' must be a positive integer up to " + std::to_string(max));
  return static_cast<int>(value->integer);
}

bool bool_field(const Json& doc, const char* key, bool fallback, const std::string& label) {
  const Json* value = doc.find(key);
  if (!value || value->is_null()) return fallback;
  if (!value->is_bool()) throw CheckError(label + ": '" + key + "' must be true or false");
  return value->boolean;
}

std::string string_field(const Json& doc, const char* key) {
  const Json* value = doc.find(key);
  return value && value->is_string() ? value->string : std::string();
}

}  // namespace

ModelConfig model_config_from_json(const Json& doc, const std::string& label) {
  if (!doc.is_object()) throw CheckError(label + ": not a JSON object");
  ModelConfig config;
  config.model_type = string_field(doc, "model_type");
  std::string architecture;
  if (const Json* list = doc.find("architectures"); list && list->is_array() && !list->items.empty() &&
                                                     list->items[0].is_string())
    architecture = list->items[0].string;

  if (config.model_type == "llama") config.family = Family::Llama;
  else if (config.model_type == "mistral") config.family = Family::Mistral;
  else if (config.model_type == "qwen2") config.family = Family::Qwen2;
  else
    throw CheckError(label + ": unsupported architecture '" + (architecture.empty() ? config.model_type : architecture) +
                     "' (model_type '" + config.model_type + "'); sinkcheck supports llama (incl. SmolLM2), mistral and qwen2");

  config.hidden_size = int_field(doc, "hidden_size", label);
  config.intermediate_size = int_field(doc, "intermediate_size", label);
  config.n_layers = int_field(doc, "num_hidden_layers", label, -1, kMaxLayersOrHeadDim);
  config.n_heads = int_field(doc, "num_attention_heads", label);
  config.n_kv_heads = int_field(doc, "num_key_value_heads", label, config.n_heads);
  config.vocab_size = int_field(doc, "vocab_size", label);
  config.head_dim = int_field(doc, "head_dim", label, config.hidden_size / config.n_heads, kMaxLayersOrHeadDim);
  if (config.n_heads % config.n_kv_heads != 0)
    throw CheckError(label + ": num_attention_heads is not a multiple of num_key_value_heads");
  if (config.head_dim <= 0 || config.head_dim > kMaxLayersOrHeadDim)
    throw CheckError(label + ": head_dim must be a positive integer up to " + std::to_string(kMaxLayersOrHeadDim));

  if (const Json* eps = doc.find("rms_norm_eps"); eps && !eps->is_null()) {
    if (!eps->is_number() || !(eps->number > 0)) throw CheckError(label + ": rms_norm_eps must be a positive number");
    config.rms_norm_eps = static_cast<float>(eps->number);
  }
  if (const Json* act = doc.find("hidden_act"); act && !act->is_null()) {
    if (!act->is_string() || act->string != "silu")
      throw CheckError(label + ": unsupported hidden_act '" + (act->is_string() ? act->string : std::string("?")) +
                       "' (sinkcheck implements the SwiGLU MLP with silu)");
  }
  config.tie_word_embeddings = bool_field(doc, "tie_word_embeddings", false, label);

  if (config.family == Family::Llama) {
    bool attention_bias = bool_field(doc, "attention_bias", false, label);
    config.qkv_bias = attention_bias;
    config.o_bias = attention_bias;
    config.mlp_bias = bool_field(doc, "mlp_bias", false, label);
  } else if (config.family == Family::Qwen2) {
    config.qkv_bias = true;
  }

  // Sliding windows, as transformers masks them: key j is visible to query i when i - w < j <= i.
  config.sliding_window.assign(config.n_layers, 0);
  if (config.family == Family::Mistral) {
    int window = int_field(doc, "sliding_window", label, 0);
    config.sliding_window.assign(config.n_layers, window);
  } else if (config.family == Family::Qwen2 && bool_field(doc, "use_sliding_window", false, label)) {
    int window = int_field(doc, "sliding_window", label, 4096);
    const Json* layer_types = doc.find("layer_types");
    if (layer_types && !layer_types->is_null()) {
      if (!layer_types->is_array() || static_cast<int>(layer_types->items.size()) != config.n_layers)
        throw CheckError(label + ": layer_types must list one type per layer");
      for (int l = 0; l < config.n_layers; ++l)
        if (layer_types->items[l].is_string() && layer_types->items[l].string == "sliding_attention")
          config.sliding_window[l] = window;
    } else {
      int max_window_layers = int_field(doc, "max_window_layers", label, 28);
      for (int l = max_window_layers; l < config.n_layers; ++l) config.sliding_window[l] = window;
    }
  }

  config.rope_inv_freq = rope_inv_freq_from_config(doc, config.head_dim, label);
  return config;
}

ModelConfig read_model_config(const std::string& path) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (!std::filesystem::exists(status)) throw CheckError("no config.json beside the weights (looked for " + path + ")");
  if (!std::filesystem::is_regular_file(status)) throw CheckError(path + " is not a regular file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw CheckError("cannot read " + path + ": " + std::strerror(errno));
  std::ostringstream text;
  text << in.rdbuf();
  return model_config_from_json(parse_json(text.str(), path), path);
}

}  // namespace sinkcheck
