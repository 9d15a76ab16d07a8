// Rotary position embeddings exactly as transformers 5 computes them (default, linear, llama3 and longrope
// variants; partial rotary).
#pragma once

#include <string>
#include <vector>

#include "config.h"
#include "json.h"

namespace sinkcheck {

// What a family's rotary embedding honours beyond the common fields.
struct RopeRules {
  bool partial_rotary = false;    // partial_rotary_factor may be below 1 (Phi-3); elsewhere anything but 1 is refused
  bool phi3_rope_names = false;   // Phi-3: rope type "su" or "yarn" means longrope, and the top-level
                                  // original_max_position_embeddings (default 4096) always wins
  double default_theta = 10000.0;
};

// The one rotary embedding of a model whose config has a flat `rope_parameters` (or legacy `rope_scaling`), following
// transformers' standardize_rope_params: `rope_scaling` wins over `rope_parameters`, the dict's own rope_theta
// over the top-level one, rules.default_theta when neither is given.
Rope rope_from_config(const Json& config, int head_dim, const RopeRules& rules, const std::string& label);

// Gemma 3: the rotary embedding of layers of `layer_type` ("full_attention" or "sliding_attention"), from
// rope_parameters keyed by layer type, or from the legacy fields (rope_theta and rope_scaling for global layers,
// rope_local_base_freq for local ones).
Rope gemma3_rope_from_config(const Json& config, const std::string& layer_type, int head_dim,
                             const std::string& label);

// cos/sin tables for positions [0, n_positions): table[pos * half + i] for i < half = rotary_dim / 2, in the
// fp32 arithmetic transformers uses (position x inv_freq rounded to fp32, then cos and sin, times
// attention_scaling).
void rope_tables(const Rope& rope, int n_positions, std::vector<float>& cos_table, std::vector<float>& sin_table);

// Rotates the first rotary_dim dims of one head vector in place at table row `pos`:
// x * cos + rotate_half(x) * sin, where rotate_half(x) = [-x2, x1] for the halves x1, x2 of those dims.
void apply_rope(float* x, int rotary_dim, const float* cos_row, const float* sin_row);

}  // namespace sinkcheck
