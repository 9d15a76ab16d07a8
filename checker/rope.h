// Rotary position embeddings exactly as transformers 5 computes them (default and llama3 variants).
#pragma once

#include <string>
#include <vector>

#include "json.h"

namespace sinkcheck {

// Inverse frequencies (head_dim / 2 of them) from a config, following transformers'
// standardize_rope_params: `rope_scaling` (legacy) wins over `rope_parameters`, the dict's own
// rope_theta over the top-level one, 10000 when neither is given.
std::vector<float> rope_inv_freq_from_config(const Json& config, int head_dim, const std::string& label);

// cos/sin tables for positions [0, n_positions): table[pos * half + i] for i < head_dim / 2, in the
// fp32 arithmetic transformers uses (position x inv_freq rounded to fp32, then cos and sin).
void rope_tables(const std::vector<float>& inv_freq, int n_positions, std::vector<float>& cos_table,
                 std::vector<float>& sin_table);

// Rotates one head vector in place at table row `pos`: x * cos + rotate_half(x) * sin, where
// rotate_half(x) = [-x2, x1] for the halves x1, x2.
void apply_rope(float* x, int head_dim, const float* cos_row, const float* sin_row);

}  // namespace sinkcheck
