#include "config.h"

#include <cerrno>
#include <cmath>
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

const char* family_name(Family family) {
  switch (family) {
    case Family::Llama: return "llama";
    case Family::Mistral: return "mistral";
    case Family::Qwen2: return "qwen2";
    case Family::Qwen3: return "qwen3";
    case Family::Gemma3: return "gemma3_text";
    case Family::Phi3: return "phi3";
    case Family::Olmo2: return "olmo2";
  }
  return "?";
}

namespace {

const char* const kSupported =
    "sinkcheck supports llama (incl. SmolLM2), mistral, qwen2, qwen3, gemma3_text, phi3 and olmo2";

// The per-layer attention types of `layer_types`: true where a layer is "sliding_attention".
std::vector<bool> sliding_layers(const Json& layer_types, int n_layers, const std::string& label) {
  if (!layer_types.is_array() || static_cast<int>(layer_types.items.size()) != n_layers)
    throw CheckError(label + ": layer_types must list one type per layer");
  std::vector<bool> sliding(n_layers);
  for (int l = 0; l < n_layers; ++l) {
    const Json& type = layer_types.items[l];
    if (!type.is_string() || (type.string != "sliding_attention" && type.string != "full_attention"))
      throw CheckError(label + ": layer_types[" + std::to_string(l) + "] is " +
                       (type.is_string() ? "'" + type.string + "'" : std::string("not a string")) +
                       " (sinkcheck implements full_attention and sliding_attention)");
    sliding[l] = type.string == "sliding_attention";
  }
  return sliding;
}

Activation activation_field(const Json& doc, const char* key, const char* fallback, const std::string& label) {
  const Json* act = doc.find(key);
  const std::string name = !act || act->is_null() ? fallback : act->is_string() ? act->string : "?";
  if (name == "silu") return Activation::Silu;
  if (name == "gelu_pytorch_tanh") return Activation::GeluTanh;
  throw CheckError(label + ": unsupported " + key + " '" + name +
                   "' (sinkcheck implements the gated MLP act(gate) * up with silu or gelu_pytorch_tanh)");
}

double positive_number(const Json& doc, const char* key, double fallback, const std::string& label) {
  const Json* value = doc.find(key);
  if (!value || value->is_null()) return fallback;
  if (!value->is_number() || !(value->number > 0) || !std::isfinite(value->number))
    throw CheckError(label + ": '" + key + "' must be a positive number");
  return value->number;
}

// A feature sinkcheck does not implement: its field must be absent, null or false.
void require_off(const Json& doc, const char* key, const std::string& label, const char* why) {
  const Json* value = doc.find(key);
  if (!value || value->is_null() || (value->is_bool() && !value->boolean)) return;
  throw CheckError(label + ": '" + key + "' is set; " + why);
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

  const std::string& type = config.model_type;
  if (type == "llama") config.family = Family::Llama;
  else if (type == "mistral") config.family = Family::Mistral;
  else if (type == "qwen2") config.family = Family::Qwen2;
  else if (type == "qwen3") config.family = Family::Qwen3;
  else if (type == "gemma3_text") config.family = Family::Gemma3;
  else if (type == "phi3") config.family = Family::Phi3;
  else if (type == "olmo2") config.family = Family::Olmo2;
  else if (type == "gemma3")
    throw CheckError(label + ": model_type 'gemma3' is the multimodal Gemma 3 (" +
                     (architecture.empty() ? std::string("Gemma3ForConditionalGeneration") : architecture) +
                     "); sinkcheck reads text-only Gemma 3 checkpoints (model_type 'gemma3_text', Gemma3ForCausalLM)");
  else
    throw CheckError(label + ": unsupported architecture '" + (architecture.empty() ? type : architecture) +
                     "' (model_type '" + type + "'); " + kSupported);
  const Family family = config.family;

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

  if (family == Family::Phi3 || family == Family::Olmo2) config.rms_norm_eps = 1e-5f;  // their configs' default
  if (const Json* eps = doc.find("rms_norm_eps"); eps && !eps->is_null()) {
    if (!eps->is_number() || !(eps->number > 0)) throw CheckError(label + ": rms_norm_eps must be a positive number");
    config.rms_norm_eps = static_cast<float>(eps->number);
  }
  config.tie_word_embeddings = bool_field(doc, "tie_word_embeddings", family == Family::Gemma3, label);

  // The layer: which RMSNorms it has and where, q/k norms, fused projections, the MLP's activation.
  if (family == Family::Gemma3) {
    config.norms = {"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm"};
    config.norm_offset = 1.0f;  // Gemma3RMSNorm: x_normed * (1 + weight)
  } else if (family == Family::Olmo2) {
    config.norms = {"", "post_attention_layernorm", "", "post_feedforward_layernorm"};
  } else {
    config.norms = {"input_layernorm", "", "post_attention_layernorm", ""};
  }
  if (family == Family::Qwen3 || family == Family::Gemma3) config.qk_norm = QkNorm::PerHead;
  if (family == Family::Olmo2) config.qk_norm = QkNorm::Whole;
  config.fused_qkv = config.fused_gate_up = family == Family::Phi3;
  config.activation = family == Family::Gemma3
                          ? activation_field(doc, "hidden_activation", "gelu_pytorch_tanh", label)
                          : activation_field(doc, "hidden_act", "silu", label);

  // Biases.
  if (family == Family::Qwen2) {
    config.qkv_bias = true;
  } else if (family == Family::Llama || family == Family::Qwen3 || family == Family::Gemma3 ||
             family == Family::Olmo2) {
    bool attention_bias = bool_field(doc, "attention_bias", false, label);
    config.qkv_bias = attention_bias;
    config.o_bias = attention_bias;
    if (family == Family::Llama) config.mlp_bias = bool_field(doc, "mlp_bias", false, label);
  }

  // Scalings: transformers computes both in Python doubles, the model uses them as fp32.
  config.attn_scale = static_cast<float>(std::pow(static_cast<double>(config.head_dim), -0.5));
  if (family == Family::Gemma3) {
    config.attn_scale = static_cast<float>(std::pow(positive_number(doc, "query_pre_attn_scalar", 256.0, label), -0.5));
    config.embed_scale = static_cast<float>(std::sqrt(static_cast<double>(config.hidden_size)));
    require_off(doc, "attn_logit_softcapping", label, "sinkcheck does not implement soft-capped attention scores");
    require_off(doc, "use_bidirectional_attention", label, "sinkcheck implements causal attention only");
  }

  // Sliding windows, as transformers masks them: key j is visible to query i when i - w < j <= i.
  config.sliding_window.assign(config.n_layers, 0);
  std::vector<bool> sliding(config.n_layers, false);
  if (family == Family::Mistral || family == Family::Phi3) {
    int window = int_field(doc, "sliding_window", label, 0);
    config.sliding_window.assign(config.n_layers, window);
  } else if ((family == Family::Qwen2 || family == Family::Qwen3) &&
             bool_field(doc, "use_sliding_window", false, label)) {
    int window = int_field(doc, "sliding_window", label, 4096);
    const Json* layer_types = doc.find("layer_types");
    if (layer_types && !layer_types->is_null()) {
      sliding = sliding_layers(*layer_types, config.n_layers, label);
    } else {
      int max_window_layers = int_field(doc, "max_window_layers", label, 28);
      for (int l = max_window_layers; l < config.n_layers; ++l) sliding[l] = true;
    }
    for (int l = 0; l < config.n_layers; ++l) config.sliding_window[l] = sliding[l] ? window : 0;
  } else if (family == Family::Gemma3) {
    // Local (sliding) and global layers, as layer_types says, or every sliding_window_pattern-th layer global.
    const Json* layer_types = doc.find("layer_types");
    if (layer_types && !layer_types->is_null()) {
      sliding = sliding_layers(*layer_types, config.n_layers, label);
    } else {
      int pattern = int_field(doc, "sliding_window_pattern", label, 6);
      for (int l = 0; l < config.n_layers; ++l) sliding[l] = (l + 1) % pattern != 0;
    }
    if (const Json* window = doc.find("sliding_window"); window && window->is_null())
      for (int l = 0; l < config.n_layers; ++l)
        if (sliding[l])
          throw CheckError(label + ": sliding_window is null but layer " + std::to_string(l) +
                           " is a sliding_attention layer");
    int window = int_field(doc, "sliding_window", label, 4096);
    for (int l = 0; l < config.n_layers; ++l) config.sliding_window[l] = sliding[l] ? window : 0;
  }

  // Rotary embeddings: Gemma 3's local and global layers have their own; every other family has one.
  config.layer_rope.assign(config.n_layers, 0);
  if (family == Family::Gemma3) {
    int index[2] = {-1, -1};  // of the global and the local embedding in config.ropes
    for (int l = 0; l < config.n_layers; ++l) {
      int& slot = index[sliding[l] ? 1 : 0];
      if (slot < 0) {
        slot = static_cast<int>(config.ropes.size());
        config.ropes.push_back(gemma3_rope_from_config(doc, sliding[l] ? "sliding_attention" : "full_attention",
                                                       config.head_dim, label));
      }
      config.layer_rope[l] = slot;
    }
  } else {
    RopeRules rules;
    rules.partial_rotary = rules.phi3_rope_names = family == Family::Phi3;
    config.ropes.push_back(rope_from_config(doc, config.head_dim, rules, label));
  }
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
