#include "rope.h"

#include <cmath>

#include "errors.h"

namespace sinkcheck {

namespace {

// The rope settings of one embedding: a key is looked up in `over` first (Gemma 3's legacy rope_scaling, which
// transformers merges over the global layers' dict), then in `base`.
struct Params {
  const Json* over = nullptr;
  const Json* base = nullptr;

  const Json* find(const char* key) const {
    for (const Json* dict : {over, base})
      if (dict)
        if (const Json* value = dict->find(key); value && !value->is_null()) return value;
    return nullptr;
  }
  bool empty() const { return !over && !base; }
};

double number_field(const Params& dict, const char* key, const std::string& label) {
  const Json* value = dict.find(key);
  if (!value || !value->is_number()) throw CheckError(label + ": rope parameter '" + key + "' is missing or not a number");
  return value->number;
}

// A top-level field that must be an object when present; nullptr when absent, null or empty.
const Json* rope_dict(const Json& config, const char* key, const std::string& label) {
  const Json* value = config.find(key);
  if (!value || value->is_null()) return nullptr;
  if (!value->is_object()) throw CheckError(label + ": rope_scaling / rope_parameters must be an object");
  return value->members.empty() ? nullptr : value;
}

// An optional number: the value when present and not null, `fallback` when absent.
double optional_number(const Json* value, double fallback, const std::string& label, const char* key) {
  if (!value || value->is_null()) return fallback;
  if (!value->is_number()) throw CheckError(label + ": " + key + " is not a number");
  return value->number;
}

bool keyed_by_layer_type(const Json* dict) {
  return dict && (dict->find("full_attention") || dict->find("sliding_attention"));
}

// The pre-training context length of llama3 and longrope scaling. transformers' standardize_rope_params gives a
// top-level original_max_position_embeddings priority (Phi-3's config always has one: 4096 by default), then the
// dict's own, then max_position_embeddings.
double original_context(const Json& config, const Params& dict, const RopeRules& rules, const std::string& label) {
  if (const Json* top = config.find("original_max_position_embeddings"); top && !top->is_null()) {
    if (!top->is_number()) throw CheckError(label + ": original_max_position_embeddings is not a number");
    return top->number;
  }
  if (rules.phi3_rope_names) return 4096.0;
  if (const Json* own = dict.find("original_max_position_embeddings")) {
    if (!own->is_number())
      throw CheckError(label + ": rope parameter 'original_max_position_embeddings' is not a number");
    return own->number;
  }
  const Json* max = config.find("max_position_embeddings");
  if (!max || !max->is_number()) throw CheckError(label + ": max_position_embeddings is missing or not a number");
  return max->number;
}

// A longrope factor list: `half` positive numbers.
std::vector<float> factor_list(const Params& dict, const char* key, size_t half, const std::string& label) {
  const Json* list = dict.find(key);
  if (!list || !list->is_array() || list->items.size() != half)
    throw CheckError(label + ": longrope '" + key + "' must be a list of " + std::to_string(half) +
                     " numbers (rotary dims / 2)");
  std::vector<float> out;
  for (const Json& item : list->items) {
    if (!item.is_number() || !(item.number > 0) || !std::isfinite(item.number))
      throw CheckError(label + ": longrope '" + key + "' must hold positive numbers");
    out.push_back(static_cast<float>(item.number));
  }
  return out;
}

// One rotary embedding from its settings, resolved theta and partial rotary factor.
Rope make_rope(const Json& config, const Params& dict, double theta, double partial, int head_dim,
               const RopeRules& rules, const std::string& label) {
  std::string rope_type = "default";
  const Json* type = dict.find("rope_type");
  if (!type) type = dict.find("type");
  if (type) {
    if (!type->is_string()) throw CheckError(label + ": rope_type is not a string");
    rope_type = type->string;
  }
  if (rules.phi3_rope_names && (rope_type == "su" || rope_type == "yarn")) rope_type = "longrope";
  if (!(theta > 0.0) || !std::isfinite(theta)) throw CheckError(label + ": rope_theta must be positive");

  // transformers: dim = int(head_dim * partial_rotary_factor); cos and sin cover 2 * len(inv_freq) dims.
  if (!(partial > 0.0 && partial <= 1.0)) throw CheckError(label + ": partial_rotary_factor must be in (0, 1]");
  Rope rope;
  rope.rotary_dim = static_cast<int>(static_cast<double>(head_dim) * partial);
  if (rope.rotary_dim % 2 != 0 || rope.rotary_dim == 0)
    throw CheckError(label + (partial == 1.0 ? std::string(": head_dim must be even for rotary embeddings")
                                             : ": head_dim x partial_rotary_factor must be a positive even number"));

  // inv_freq = 1 / base ** (arange(0, dim, 2).float() / dim), all in fp32.
  const int half = rope.rotary_dim / 2;
  std::vector<float>& inv_freq = rope.inv_freq;
  inv_freq.resize(half);
  const float base = static_cast<float>(theta);
  std::vector<float> power(half);
  for (int i = 0; i < half; ++i) {
    float exponent = static_cast<float>(2 * i) / static_cast<float>(rope.rotary_dim);
    power[i] = std::pow(base, exponent);
    inv_freq[i] = 1.0f / power[i];
  }

  if (rope_type == "default") return rope;
  if (rope_type == "linear") {
    // Positions divided by `factor`, applied to the frequencies.
    const double factor = number_field(dict, "factor", label);
    if (!(factor > 0.0) || !std::isfinite(factor)) throw CheckError(label + ": linear rope factor must be positive");
    for (float& f : inv_freq) f /= static_cast<float>(factor);
    return rope;
  }
  if (rope_type == "longrope") {
    // The short factors, for sequences up to the pre-training length, and cos/sin scaled by attention_factor.
    const std::vector<float> short_factor = factor_list(dict, "short_factor", half, label);
    factor_list(dict, "long_factor", half, label);  // checked as transformers does; used only past max_length
    const double original = original_context(config, dict, rules, label);
    if (!(original >= 2.0) || original > 1e9 || original != std::floor(original))
      throw CheckError(label + ": longrope original_max_position_embeddings must be an integer of at least 2");
    double factor;
    if (const Json* own = dict.find("factor")) {
      if (!own->is_number()) throw CheckError(label + ": rope parameter 'factor' is not a number");
      factor = own->number;
    } else {
      const Json* max = config.find("max_position_embeddings");
      if (!max || !max->is_number()) throw CheckError(label + ": max_position_embeddings is missing or not a number");
      factor = max->number / original;
    }
    double attention_factor;
    if (const Json* own = dict.find("attention_factor")) {
      if (!own->is_number()) throw CheckError(label + ": rope parameter 'attention_factor' is not a number");
      attention_factor = own->number;
    } else {
      attention_factor = factor <= 1.0 ? 1.0 : std::sqrt(1.0 + std::log(factor) / std::log(original));
    }
    if (!(attention_factor > 0.0) || !std::isfinite(attention_factor))
      throw CheckError(label + ": longrope attention_factor must be positive");
    for (int i = 0; i < half; ++i) inv_freq[i] = 1.0f / (short_factor[i] * power[i]);
    rope.attention_scaling = static_cast<float>(attention_factor);
    rope.max_length = static_cast<int>(original);
    return rope;
  }
  if (rope_type != "llama3")
    throw CheckError(label + ": unsupported rope type '" + rope_type +
                     "' (sinkcheck supports default, linear, llama3 and longrope)");

  // llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
  const double factor = number_field(dict, "factor", label);
  const double low_freq_factor = number_field(dict, "low_freq_factor", label);
  const double high_freq_factor = number_field(dict, "high_freq_factor", label);
  const double old_context_len = original_context(config, dict, rules, label);
  if (!(factor > 0.0) || high_freq_factor == low_freq_factor)
    throw CheckError(label + ": llama3 rope parameters are inconsistent");
  const float low_freq_wavelen = static_cast<float>(old_context_len / low_freq_factor);
  const float high_freq_wavelen = static_cast<float>(old_context_len / high_freq_factor);
  const float f_factor = static_cast<float>(factor);
  const float two_pi = static_cast<float>(2.0 * M_PI);
  for (int i = 0; i < half; ++i) {
    float freq = inv_freq[i];
    float wavelen = two_pi / freq;
    float scaled = wavelen > low_freq_wavelen ? freq / f_factor : freq;
    bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
    if (medium) {
      float smooth = (static_cast<float>(old_context_len) / wavelen - static_cast<float>(low_freq_factor)) /
                     static_cast<float>(high_freq_factor - low_freq_factor);
      scaled = (1.0f - smooth) * scaled / f_factor + smooth * scaled;
    }
    inv_freq[i] = scaled;
  }
  return rope;
}

// Families without partial rotary refuse any partial_rotary_factor other than 1, wherever it is written.
void refuse_partial(const Json& config, const Params& dict, const std::string& label) {
  for (const Json* partial : {dict.find("partial_rotary_factor"), config.find("partial_rotary_factor")})
    if (partial && !partial->is_null() && (!partial->is_number() || partial->number != 1.0))
      throw CheckError(label + ": partial_rotary_factor other than 1 is not supported for this family");
}

}  // namespace

Rope rope_from_config(const Json& config, int head_dim, const RopeRules& rules, const std::string& label) {
  const Json* scaling = rope_dict(config, "rope_scaling", label);
  const Json* parameters = rope_dict(config, "rope_parameters", label);
  Params dict;
  dict.base = scaling ? scaling : parameters;
  if (keyed_by_layer_type(dict.base))
    throw CheckError(label + ": rope parameters keyed by layer type, but " +
                     "this family has one rotary embedding for every layer");
  const double theta = optional_number(dict.find("rope_theta"),
                                       optional_number(config.find("rope_theta"), rules.default_theta, label,
                                                       "rope_theta"),
                                       label, "rope_theta");
  double partial = 1.0;
  if (rules.partial_rotary) {
    const Json* own = dict.find("partial_rotary_factor");
    partial = optional_number(own ? own : config.find("partial_rotary_factor"), 1.0, label, "partial_rotary_factor");
  } else {
    refuse_partial(config, dict, label);
  }
  return make_rope(config, dict, theta, partial, head_dim, rules, label);
}

Rope gemma3_rope_from_config(const Json& config, const std::string& layer_type, int head_dim,
                             const std::string& label) {
  const Json* parameters = rope_dict(config, "rope_parameters", label);
  if (parameters && !keyed_by_layer_type(parameters))
    throw CheckError(label + ": rope_parameters must be keyed by layer type (full_attention, sliding_attention)");
  const bool global = layer_type == "full_attention";
  Params dict;
  if (parameters)
    if (const Json* own = parameters->find(layer_type); own && !own->is_null()) {
      if (!own->is_object()) throw CheckError(label + ": rope_parameters['" + layer_type + "'] must be an object");
      dict.base = own;
    }
  if (global) dict.over = rope_dict(config, "rope_scaling", label);  // legacy: scales the global layers only
  // transformers' Gemma 3 defaults: theta 1e6 for global layers (rope_theta), 1e4 for local ones
  // (rope_local_base_freq).
  const double top = global ? optional_number(config.find("rope_theta"), 1e6, label, "rope_theta")
                            : optional_number(config.find("rope_local_base_freq"), 1e4, label, "rope_local_base_freq");
  const double theta = optional_number(dict.find("rope_theta"), top, label, "rope_theta");
  refuse_partial(config, dict, label);
  return make_rope(config, dict, theta, 1.0, head_dim, RopeRules{}, label + " (" + layer_type + " layers)");
}

void rope_tables(const Rope& rope, int n_positions, std::vector<float>& cos_table, std::vector<float>& sin_table) {
  const size_t half = rope.inv_freq.size();
  cos_table.resize(static_cast<size_t>(n_positions) * half);
  sin_table.resize(static_cast<size_t>(n_positions) * half);
  const float scaling = rope.attention_scaling;
  for (int pos = 0; pos < n_positions; ++pos) {
    for (size_t i = 0; i < half; ++i) {
      float angle = static_cast<float>(pos) * rope.inv_freq[i];
      float c = static_cast<float>(std::cos(static_cast<double>(angle)));
      float s = static_cast<float>(std::sin(static_cast<double>(angle)));
      cos_table[pos * half + i] = scaling == 1.0f ? c : c * scaling;
      sin_table[pos * half + i] = scaling == 1.0f ? s : s * scaling;
    }
  }
}

void apply_rope(float* x, int rotary_dim, const float* cos_row, const float* sin_row) {
  const int half = rotary_dim / 2;
  for (int i = 0; i < half; ++i) {
    float x1 = x[i];
    float x2 = x[i + half];
    x[i] = x1 * cos_row[i] - x2 * sin_row[i];
    x[i + half] = x2 * cos_row[i] + x1 * sin_row[i];
  }
}

}  // namespace sinkcheck
