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

// Called after each batch of each layer: work done and total (token rows x layers), and layer steps
// done and total (n_layers per pass; one pass unless the probes' residual stream exceeds max_pass_rows).
using Progress = std::function<void(long long done, long long total, int steps_done, int steps_total)>;

// How sequences are grouped. Sequences run in sorted order so that neighbours share prefixes
// (reuse_prefixes); a pass takes up to max_pass_rows new token rows (0: as many as fit in 256 MB of
// residual stream) through every layer, in batches of about batch_tokens new tokens. Each layer's
// weights are converted once per pass. No setting changes a result: per-row arithmetic is the same.
struct RunOptions {
  bool reuse_prefixes = true;
  int batch_tokens = 512;
  long long max_pass_rows = 0;
};

// a_h(X) over `sequences`: for each sequence x of length T > sink + 1, a_h(x) is the mean of
// A_h[i, sink] over queries i = sink+1 .. T-1; shorter sequences contribute nothing. Throws CheckError
// for an out-of-range token id or when no sequence qualifies, then (Model::check_finite) for a NaN or
// infinity in any floating-point tensor of the checkpoint.
SinkMeans mean_sink_values(Model& model, const std::vector<Sequence>& sequences, int sink, const char* set_name,
                           const Progress& progress = nullptr, const RunOptions& options = {});

// d_h = a_h(harmful) - a_h(harmless) for every layer and query head; both sets share each pass. The same
// checks as mean_sink_values, before any compute.
SinkDivergence sink_divergence(Model& model, const std::vector<Sequence>& harmful,
                               const std::vector<Sequence>& harmless, int sink, const Progress& progress = nullptr,
                               const RunOptions& options = {});

}  // namespace sinkcheck
