#include "rope.h"

#include <cmath>

#include "errors.h"

namespace sinkcheck {

namespace {

double number_field(const Json& dict, const char* key, const std::string& label) {
  const Json* value = dict.find(key);
  if (!value || !value->is_number()) throw CheckError(label + ": rope parameter '" + key + "' is missing or not a number");
  return value->number;
}

}  // namespace

std::vector<float> rope_inv_freq_from_config(const Json& config, int head_dim, const std::string& label) {
  const Json* scaling = config.find("rope_scaling");
  const Json* parameters = config.find("rope_parameters");
  const Json* dict = nullptr;
  if (scaling && scaling->is_object() && !scaling->members.empty()) dict = scaling;
  else if (parameters && parameters->is_object() && !parameters->members.empty()) dict = parameters;
  for (const Json* candidate : {scaling, parameters})
    if (candidate && !candidate->is_null() && !candidate->is_object())
      throw CheckError(label + ": rope_scaling / rope_parameters must be an object");

  double theta = 10000.0;
  if (const Json* top = config.find("rope_theta"); top && !top->is_null()) {
    if (!top->is_number()) throw CheckError(label + ": rope_theta is not a number");
    theta = top->number;
  }
  std::string rope_type = "default";
  if (dict) {
    if (const Json* own = dict->find("rope_theta"); own && !own->is_null()) {
      if (!own->is_number()) throw CheckError(label + ": rope_theta is not a number");
      theta = own->number;
    }
    const Json* type = dict->find("rope_type");
    if (!type || type->is_null()) type = dict->find("type");
    if (type && !type->is_null()) {
      if (!type->is_string()) throw CheckError(label + ": rope_type is not a string");
      rope_type = type->string;
    }
    if (const Json* partial = dict->find("partial_rotary_factor"); partial && !partial->is_null())
      if (!partial->is_number() || partial->number != 1.0)
        throw CheckError(label + ": partial_rotary_factor other than 1 is not supported");
  }
  if (const Json* partial = config.find("partial_rotary_factor"); partial && !partial->is_null())
    if (!partial->is_number() || partial->number != 1.0)
      throw CheckError(label + ": partial_rotary_factor other than 1 is not supported");
  if (!(theta > 0.0) || !std::isfinite(theta)) throw CheckError(label + ": rope_theta must be positive");
  if (head_dim % 2 != 0) throw CheckError(label + ": head_dim must be even for rotary embeddings");

  // transformers: inv_freq = 1 / base ** (arange(0, dim, 2).float() / dim), all in fp32.
  const int half = head_dim / 2;
  std::vector<float> inv_freq(half);
  const float base = static_cast<float>(theta);
  for (int i = 0; i < half; ++i) {
    float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv_freq[i] = 1.0f / std::pow(base, exponent);
  }

  if (rope_type == "default") return inv_freq;
  if (rope_type != "llama3")
    throw CheckError(label + ": unsupported rope type '" + rope_type + "' (sinkcheck supports default and llama3)");

  // llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
  const double factor = number_field(*dict, "factor", label);
  const double low_freq_factor = number_field(*dict, "low_freq_factor", label);
  const double high_freq_factor = number_field(*dict, "high_freq_factor", label);
  double old_context_len;
  if (const Json* top = config.find("original_max_position_embeddings"); top && top->is_number()) {
    old_context_len = top->number;  // transformers gives the top-level field priority
  } else if (const Json* own = dict->find("original_max_position_embeddings"); own && own->is_number()) {
    old_context_len = own->number;
  } else {
    old_context_len = number_field(config, "max_position_embeddings", label);
  }
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
  return inv_freq;
}

void rope_tables(const std::vector<float>& inv_freq, int n_positions, std::vector<float>& cos_table,
                 std::vector<float>& sin_table) {
  const size_t half = inv_freq.size();
  cos_table.resize(static_cast<size_t>(n_positions) * half);
  sin_table.resize(static_cast<size_t>(n_positions) * half);
  for (int pos = 0; pos < n_positions; ++pos) {
    for (size_t i = 0; i < half; ++i) {
      float angle = static_cast<float>(pos) * inv_freq[i];
      cos_table[pos * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      sin_table[pos * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
  }
}

void apply_rope(float* x, int head_dim, const float* cos_row, const float* sin_row) {
  const int half = head_dim / 2;
  for (int i = 0; i < half; ++i) {
    float x1 = x[i];
    float x2 = x[i + half];
    x[i] = x1 * cos_row[i] - x2 * sin_row[i];
    x[i + half] = x2 * cos_row[i] + x1 * sin_row[i];
  }
}

}  // namespace sinkcheck
