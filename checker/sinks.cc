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
    if (sequences[k].size() <= size_t(sink) + 1) continue;
    if (model.max_length() > 0 && sequences[k].size() > size_t(model.max_length()))
      throw CheckError(std::string(set_name) + " sequence " + std::to_string(k) + " has " +
                       std::to_string(sequences[k].size()) + " tokens, more than this model's longrope "
                       "original_max_position_embeddings (" + std::to_string(model.max_length()) +
                       "): transformers switches to the long factors there, for a whole batch at once, which "
                       "sinkcheck does not implement; use probes of at most that many tokens");
    order.push_back(k);
  }
  if (order.empty())
    throw CheckError(std::string("no probes: the ") + set_name + " set has no sequence longer than sink position " +
                     std::to_string(sink) + " + 1");
  return order;
}

struct SetInput {
  const std::vector<Sequence>* sequences;
  const char* name;
};

// a_h for each set, all sets sharing the passes: each pass reads every layer's weights once.
std::vector<SinkMeans> sink_means(Model& model, const std::vector<SetInput>& sets, int sink, const Progress& progress,
                                  const RunOptions& options) {
  const ModelConfig& c = model.config();
  const size_t heads = size_t(c.n_layers) * c.n_heads;

  // Every set is checked before any is run, so bad input fails fast.
  std::vector<std::vector<size_t>> qualifying;
  for (const SetInput& set : sets) qualifying.push_back(qualifying_sequences(model, *set.sequences, sink, set.name));
  // Then every float tensor of the checkpoint, read or not by the statistic: a NaN or infinity anywhere is refused.
  model.check_finite();

  struct Ref {
    size_t set, index;
  };
  std::vector<Ref> order;
  for (size_t s = 0; s < sets.size(); ++s) {
    std::vector<size_t> mine = qualifying[s];
    const std::vector<Sequence>& seqs = *sets[s].sequences;
    if (options.reuse_prefixes)
      std::sort(mine.begin(), mine.end(), [&](size_t a, size_t b) { return seqs[a] < seqs[b]; });
    for (size_t k : mine) order.push_back(Ref{s, k});
  }

  // Passes of at most pass_limit new rows, each split into batches of about batch_tokens new rows.
  const long long pass_limit =
      options.max_pass_rows > 0 ? options.max_pass_rows
                                : std::max<long long>(1, (256LL << 20) / (4LL * c.hidden_size));
  const int batch_tokens = std::max(options.batch_tokens, 1);
  struct Pass {
    std::vector<BatchItem> items;
    std::vector<size_t> batch_ends;
    std::vector<Ref> refs;
    long long rows = 0;
  };
  std::vector<Pass> passes;
  int batch_new = 0;
  for (const Ref& ref : order) {
    const Sequence& seq = (*sets[ref.set].sequences)[ref.index];
    const int length = static_cast<int>(seq.size());
    if (passes.empty()) passes.emplace_back();
    Pass* pass = &passes.back();
    int shared = 0;
    if (options.reuse_prefixes && !pass->items.empty())
      shared = common_prefix((*sets[pass->refs.back().set].sequences)[pass->refs.back().index], seq);
    int fresh = length - shared;
    if (!pass->items.empty() && pass->rows + fresh > pass_limit) {
      pass->batch_ends.push_back(pass->items.size());
      passes.emplace_back();
      pass = &passes.back();
      shared = 0;
      fresh = length;
      batch_new = 0;
    } else if (!pass->items.empty() && batch_new + fresh > batch_tokens) {
      pass->batch_ends.push_back(pass->items.size());
      batch_new = 0;
    }
    pass->items.push_back(BatchItem{seq.data(), length, shared});
    pass->refs.push_back(ref);
    pass->rows += fresh;
    batch_new += fresh;
  }
  passes.back().batch_ends.push_back(passes.back().items.size());

  long long total_work = 0;
  for (const Pass& pass : passes) total_work += pass.rows * c.n_layers;
  const int total_steps = static_cast<int>(passes.size()) * c.n_layers;

  // a_h(x) per input sequence, summed in input order at the end: the result does not depend on the
  // processing order, prefix reuse, batches or passes.
  std::vector<std::vector<double>> per_sequence(sets.size());
  for (size_t s = 0; s < sets.size(); ++s) per_sequence[s].assign(sets[s].sequences->size() * heads, 0.0);
  std::vector<double> sums;
  long long work_before = 0;
  for (size_t p = 0; p < passes.size(); ++p) {
    const Pass& pass = passes[p];
    sums.assign(pass.items.size() * heads, 0.0);
    LayerStep step = nullptr;
    if (progress)
      step = [&](int layer, long long rows_done) {
        progress(work_before + layer * pass.rows + rows_done, total_work,
                 static_cast<int>(p) * c.n_layers + layer + (rows_done == pass.rows ? 1 : 0), total_steps);
      };
    model.sink_sums(pass.items, pass.batch_ends, sink, sums.data(), step);
    for (size_t j = 0; j < pass.items.size(); ++j) {
      const double n_queries = double(pass.items[j].length - sink - 1);
      double* slot = per_sequence[pass.refs[j].set].data() + pass.refs[j].index * heads;
      for (size_t lh = 0; lh < heads; ++lh) slot[lh] = sums[j * heads + lh] / n_queries;
    }
    work_before += pass.rows * c.n_layers;
  }

  std::vector<SinkMeans> results(sets.size());
  for (size_t s = 0; s < sets.size(); ++s) {
    SinkMeans& result = results[s];
    result.n_layers = c.n_layers;
    result.n_heads = c.n_heads;
    result.mean.assign(heads, 0.0);
    result.n_sequences = static_cast<int>(qualifying[s].size());
    for (size_t k : qualifying[s])  // ascending: input order
      for (size_t lh = 0; lh < heads; ++lh) result.mean[lh] += per_sequence[s][k * heads + lh];
    for (double& m : result.mean) m /= result.n_sequences;
  }
  return results;
}

}  // namespace

SinkMeans mean_sink_values(Model& model, const std::vector<Sequence>& sequences, int sink, const char* set_name,
                           const Progress& progress, const RunOptions& options) {
  return sink_means(model, {SetInput{&sequences, set_name}}, sink, progress, options)[0];
}

SinkDivergence sink_divergence(Model& model, const std::vector<Sequence>& harmful,
                               const std::vector<Sequence>& harmless, int sink, const Progress& progress,
                               const RunOptions& options) {
  std::vector<SinkMeans> means =
      sink_means(model, {SetInput{&harmful, "harmful"}, SetInput{&harmless, "harmless"}}, sink, progress, options);
  SinkDivergence result;
  result.harmful = std::move(means[0]);
  result.harmless = std::move(means[1]);
  result.divergence.resize(result.harmful.mean.size());
  for (size_t i = 0; i < result.divergence.size(); ++i) {
    result.divergence[i] = result.harmful.mean[i] - result.harmless.mean[i];
    if (result.divergence[i] > 0) ++result.positive;
  }
  return result;
}

}  // namespace sinkcheck
