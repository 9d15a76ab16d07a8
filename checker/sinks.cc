#include "sinks.h"

#include <algorithm>
#include <numeric>
#include <string>

#include "errors.h"

namespace sinkcheck {

namespace {

int common_prefix(const Sequence& a, const Sequence& b) {
  size_t n = std::min(a.size(), b.size()), i = 0;
  while (i < n && a[i] == b[i]) ++i;
  return static_cast<int>(i);
}

// Indexes of the sequences with a query after the sink, after checking every token id.
std::vector<size_t> qualifying_sequences(const Model& model, const std::vector<Sequence>& sequences, int sink,
                                         const char* set_name) {
  if (sink < 0) throw CheckError("sink position must be non-negative, got " + std::to_string(sink));
  std::vector<size_t> order;
  for (size_t k = 0; k < sequences.size(); ++k) {
    for (int32_t id : sequences[k])
      if (id < 0 || id >= model.vocab_rows())
        throw CheckError(std::string("probe token id ") + std::to_string(id) + " in " + set_name + " sequence " +
                         std::to_string(k) + " is outside the vocabulary of " + std::to_string(model.vocab_rows()));
    if (sequences[k].size() > size_t(sink) + 1) order.push_back(k);
  }
  if (order.empty())
    throw CheckError(std::string("no probes: the ") + set_name + " set has no sequence longer than sink position " +
                     std::to_string(sink) + " + 1");
  return order;
}

}  // namespace

SinkMeans mean_sink_values(Model& model, const std::vector<Sequence>& sequences, int sink, const char* set_name,
                           const Progress& progress, bool reuse_prefixes, int batch_tokens) {
  const ModelConfig& c = model.config();
  SinkMeans result;
  result.n_layers = c.n_layers;
  result.n_heads = c.n_heads;
  result.mean.assign(size_t(c.n_layers) * c.n_heads, 0.0);

  std::vector<size_t> order = qualifying_sequences(model, sequences, sink, set_name);
  if (reuse_prefixes)
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return sequences[a] < sequences[b]; });

  long long total = 0, done = 0;
  for (size_t k : order) total += static_cast<long long>(sequences[k].size());

  // a_h(x) per input sequence, summed in input order at the end: the result does not depend on the
  // processing order, prefix reuse or batching.
  const size_t heads = result.mean.size();
  std::vector<double> per_sequence(sequences.size() * heads, 0.0);
  std::vector<BatchItem> batch;
  std::vector<size_t> batch_index;
  std::vector<double> sums;
  auto flush = [&] {
    if (batch.empty()) return;
    sums.assign(batch.size() * c.n_layers * c.n_heads, 0.0);
    model.sink_sums(batch, sink, sums.data());
    for (size_t j = 0; j < batch.size(); ++j) {
      const double n_queries = double(batch[j].length - sink - 1);
      double* slot = per_sequence.data() + batch_index[j] * heads;
      for (size_t lh = 0; lh < heads; ++lh) slot[lh] = sums[j * heads + lh] / n_queries;
      done += batch[j].length;
    }
    batch.clear();
    batch_index.clear();
    if (progress) progress(done, total);
  };

  int new_tokens = 0;
  for (size_t k : order) {
    const Sequence& seq = sequences[k];
    // Share with the item before: in this batch, or the model's carried last item of the previous one.
    auto shared_with_previous = [&] {
      if (!reuse_prefixes) return 0;
      return batch.empty() ? common_prefix(model.carried_tokens(), seq) : common_prefix(sequences[batch_index.back()], seq);
    };
    int shared = shared_with_previous();
    int fresh = static_cast<int>(seq.size()) - shared;
    if (!batch.empty() && new_tokens + fresh > batch_tokens) {
      flush();
      new_tokens = 0;
      shared = shared_with_previous();
      fresh = static_cast<int>(seq.size()) - shared;
    }
    batch.push_back(BatchItem{seq.data(), static_cast<int>(seq.size()), shared});
    batch_index.push_back(k);
    new_tokens += fresh;
  }
  flush();

  result.n_sequences = static_cast<int>(order.size());
  std::sort(order.begin(), order.end());
  for (size_t k : order)
    for (size_t lh = 0; lh < heads; ++lh) result.mean[lh] += per_sequence[k * heads + lh];
  for (double& m : result.mean) m /= result.n_sequences;
  return result;
}

SinkDivergence sink_divergence(Model& model, const std::vector<Sequence>& harmful,
                               const std::vector<Sequence>& harmless, int sink, const Progress& progress,
                               bool reuse_prefixes) {
  // Both sets are checked before either is run, so bad input fails fast.
  qualifying_sequences(model, harmful, sink, "harmful");
  qualifying_sequences(model, harmless, sink, "harmless");
  long long harmful_total = 0, harmless_total = 0;
  for (const auto& s : harmful) harmful_total += static_cast<long long>(s.size());
  for (const auto& s : harmless) harmless_total += static_cast<long long>(s.size());
  const long long total = harmful_total + harmless_total;
  Progress first = nullptr, second = nullptr;
  if (progress) {
    first = [&](long long done, long long) { progress(done, total); };
    second = [&](long long done, long long) { progress(harmful_total + done, total); };
  }
  SinkDivergence result;
  result.harmful = mean_sink_values(model, harmful, sink, "harmful", first, reuse_prefixes);
  result.harmless = mean_sink_values(model, harmless, sink, "harmless", second, reuse_prefixes);
  result.divergence.resize(result.harmful.mean.size());
  for (size_t i = 0; i < result.divergence.size(); ++i) {
    result.divergence[i] = result.harmful.mean[i] - result.harmless.mean[i];
    if (result.divergence[i] > 0) ++result.positive;
  }
  return result;
}

}  // namespace sinkcheck
