// The sink statistic: per layer and query head, the mean attention weight on the sink position.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "model.h"

namespace sinkcheck {

using Sequence = std::vector<int32_t>;

struct SinkMeans {
  int n_layers = 0;
  int n_heads = 0;
  std::vector<double> mean;  // [layer * n_heads + head]: a_h(X), the mean over sequences of a_h(x)
  int n_sequences = 0;       // sequences that had a query after the sink (length > sink + 1)
};

struct SinkDivergence {
  SinkMeans harmful, harmless;
  std::vector<double> divergence;  // harmful - harmless, [layer * n_heads + head]
  int positive = 0;                // heads with divergence > 0
};

// Called after each batch with (tokens done, tokens total).
using Progress = std::function<void(long long done, long long total)>;

// a_h(X) over `sequences`: for each sequence x of length T > sink + 1, a_h(x) is the mean of
// A_h[i, sink] over queries i = sink+1 .. T-1; shorter sequences contribute nothing. Sequences are
// processed in sorted order so that neighbours share prefixes (reuse_prefixes), in batches of about
// batch_tokens new tokens. Throws CheckError for an out-of-range token id or when no sequence qualifies.
SinkMeans mean_sink_values(Model& model, const std::vector<Sequence>& sequences, int sink, const char* set_name,
                           const Progress& progress = nullptr, bool reuse_prefixes = true, int batch_tokens = 512);

// d_h = a_h(harmful) - a_h(harmless) for every layer and query head.
SinkDivergence sink_divergence(Model& model, const std::vector<Sequence>& harmful,
                               const std::vector<Sequence>& harmless, int sink, const Progress& progress = nullptr,
                               bool reuse_prefixes = true);

}  // namespace sinkcheck
