#include "model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "errors.h"
#include "rope.h"

namespace sinkcheck {

namespace {

std::string layer_name(int layer, const char* suffix) {
  return "model.layers." + std::to_string(layer) + "." + suffix;
}

// Runs fn(first_row, last_row) over `rows` rows split evenly across the pool.
template <typename Fn>
void for_rows(ThreadPool& pool, int rows, Fn fn) {
  const int n_tasks = std::min(pool.size(), std::max(rows, 1));
  pool.run(n_tasks, [&](int task, int) { fn(rows * task / n_tasks, rows * (task + 1) / n_tasks); });
}

template <typename T>
void ensure_size(std::vector<T>& buffer, size_t n) {
  if (buffer.size() < n) buffer.resize(n);
}

}  // namespace

Model::Model(const std::string& path, int n_threads)
    : checkpoint_(path),
      config_(read_model_config((std::filesystem::path(checkpoint_.directory()) / "config.json").string())),
      pool_(n_threads) {
  load_weights();
}

void Model::load_weights() {
  const ModelConfig& c = config_;
  const int64_t hidden = c.hidden_size, q_dim = int64_t(c.n_heads) * c.head_dim,
                kv_dim = int64_t(c.n_kv_heads) * c.head_dim, inter = c.intermediate_size;

  // Embeddings: tied models may store only one of the two matrices; the input side is what we need.
  const std::string embed_name =
      (!checkpoint_.find("model.embed_tokens.weight") && c.tie_word_embeddings && checkpoint_.find("lm_head.weight"))
          ? "lm_head.weight"
          : "model.embed_tokens.weight";
  weights_.embed = &checkpoint_.require(embed_name, {c.vocab_size, hidden});
  checkpoint_.require("model.norm.weight", {hidden});

  auto vector_of = [&](const std::string& name, int64_t n) { return tensor_to_fp32(checkpoint_.require(name, {n})); };
  auto matrix_of = [&](const std::string& name, int64_t out, int64_t in, bool has_bias, bool load) {
    const TensorEntry& weight = checkpoint_.require(name + ".weight", {out, in});
    const TensorEntry* bias = has_bias ? &checkpoint_.require(name + ".bias", {out}) : nullptr;
    if (!load) return PackedMatrix{};
    std::vector<float> w = tensor_to_fp32(weight);
    return pack_matrix(w.data(), static_cast<int>(out), static_cast<int>(in),
                       bias ? tensor_to_fp32(*bias) : std::vector<float>{});
  };

  weights_.layers.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    // Every tensor is checked; the last layer's value, output and MLP weights are not loaded
    // because attention weights of the last layer depend only on its queries and keys.
    const bool last = (l == c.n_layers - 1);
    LayerWeights& lw = weights_.layers[l];
    lw.attn_norm = vector_of(layer_name(l, "input_layernorm.weight"), hidden);
    lw.wq = matrix_of(layer_name(l, "self_attn.q_proj"), q_dim, hidden, c.qkv_bias, true);
    lw.wk = matrix_of(layer_name(l, "self_attn.k_proj"), kv_dim, hidden, c.qkv_bias, true);
    lw.wv = matrix_of(layer_name(l, "self_attn.v_proj"), kv_dim, hidden, c.qkv_bias, !last);
    lw.wo = matrix_of(layer_name(l, "self_attn.o_proj"), hidden, q_dim, c.o_bias, !last);
    checkpoint_.require(layer_name(l, "post_attention_layernorm.weight"), {hidden});
    if (!last) lw.mlp_norm = vector_of(layer_name(l, "post_attention_layernorm.weight"), hidden);
    lw.w_gate = matrix_of(layer_name(l, "mlp.gate_proj"), inter, hidden, c.mlp_bias, !last);
    lw.w_up = matrix_of(layer_name(l, "mlp.up_proj"), inter, hidden, c.mlp_bias, !last);
    lw.w_down = matrix_of(layer_name(l, "mlp.down_proj"), hidden, inter, c.mlp_bias, !last);
  }
}

void Model::prepare(const std::vector<BatchItem>& batch) {
  const ModelConfig& c = config_;
  RunState& s = state_;
  const size_t n_items = batch.size();
  s.item_start.assign(n_items + 1, 0);
  s.item_first_row.assign(n_items + 1, 0);
  int max_length = 0;
  for (size_t j = 0; j < n_items; ++j) {
    s.item_start[j + 1] = s.item_start[j] + batch[j].length;
    s.item_first_row[j + 1] = s.item_first_row[j] + (batch[j].length - batch[j].shared);
    max_length = std::max(max_length, batch[j].length);
  }
  const size_t rows = s.item_first_row[n_items], positions = s.item_start[n_items];
  const size_t q_dim = size_t(c.n_heads) * c.head_dim, kv_dim = size_t(c.n_kv_heads) * c.head_dim;
  ensure_size(s.x, rows * c.hidden_size);
  ensure_size(s.xn, rows * c.hidden_size);
  ensure_size(s.proj, rows * c.hidden_size);
  ensure_size(s.q, rows * q_dim);
  ensure_size(s.att, rows * q_dim);
  ensure_size(s.k_new, rows * kv_dim);
  ensure_size(s.v_new, rows * kv_dim);
  ensure_size(s.gate, rows * c.intermediate_size);
  ensure_size(s.up, rows * c.intermediate_size);
  ensure_size(s.keys, positions * kv_dim);
  ensure_size(s.values, positions * kv_dim);
  ensure_size(s.sink_weight, positions * c.n_heads);
  ensure_size(s.row_item, rows);
  ensure_size(s.row_pos, rows);
  for (size_t j = 0; j < n_items; ++j)
    for (int p = batch[j].shared; p < batch[j].length; ++p) {
      size_t r = s.item_first_row[j] + (p - batch[j].shared);
      s.row_item[r] = static_cast<int>(j);
      s.row_pos[r] = p;
    }
  if (max_length > s.rope_positions) {
    rope_tables(c.rope_inv_freq, max_length, s.rope_cos, s.rope_sin);
    s.rope_positions = max_length;
  }
  ensure_size(s.scores, size_t(pool_.size()) * s.rope_positions);  // one row of rope_positions per thread
}

// Causal (optionally sliding-window) softmax attention for every new row of every item. Records
// A[i, sink] for each head and, unless this is the last layer, the attention output.
void Model::attention(const std::vector<BatchItem>& batch, int layer, int sink, bool need_output) {
  const ModelConfig& c = config_;
  RunState& s = state_;
  const int hd = c.head_dim, group = c.n_heads / c.n_kv_heads, window = c.sliding_window[layer];
  const size_t q_dim = size_t(c.n_heads) * hd, kv_dim = size_t(c.n_kv_heads) * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int n_items = static_cast<int>(batch.size());

  pool_.run(n_items * c.n_heads, [&](int task, int thread) {
    const int j = task / c.n_heads, h = task % c.n_heads, g = h / group;
    const BatchItem& item = batch[j];
    const float* keys = s.keys.data() + s.item_start[j] * kv_dim + size_t(g) * hd;
    const float* values = s.values.data() + s.item_start[j] * kv_dim + size_t(g) * hd;
    float* sink_row = s.sink_weight.data() + s.item_start[j] * c.n_heads;
    float* scores = s.scores.data() + size_t(thread) * s.rope_positions;
    for (int i = item.shared; i < item.length; ++i) {
      const size_t r = s.item_first_row[j] + (i - item.shared);
      const float* q = s.q.data() + r * q_dim + size_t(h) * hd;
      const int lo = window > 0 ? std::max(0, i - window + 1) : 0;
      const int n = i - lo + 1;
      attention_scores(q, keys + size_t(lo) * kv_dim, kv_dim, n, hd, scale, scores);
      const float max = *std::max_element(scores, scores + n);
      const float inv_sum = 1.0f / exp_shift_sum(scores, n, max);
      for (int t = 0; t < n; ++t) scores[t] *= inv_sum;  // softmax probabilities
      sink_row[size_t(i) * c.n_heads + h] = (sink >= lo && sink <= i) ? scores[sink - lo] : 0.0f;
      if (need_output) weighted_sum(scores, values + size_t(lo) * kv_dim, kv_dim, n, hd, s.att.data() + r * q_dim + size_t(h) * hd);
    }
  });
}

void Model::sink_sums(const std::vector<BatchItem>& batch, int sink, double* out) {
  const ModelConfig& c = config_;
  RunState& s = state_;
  for (size_t j = 0; j < batch.size(); ++j) {
    const BatchItem& item = batch[j];
    const int previous_length = j == 0 ? static_cast<int>(s.carry_tokens.size()) : batch[j - 1].length;
    if (item.shared < 0 || item.shared > item.length || item.shared > previous_length)
      throw CheckError("internal: bad shared prefix in batch");
  }
  prepare(batch);
  s.carry_keys.resize(c.n_layers);
  s.carry_values.resize(c.n_layers);
  s.carry_sink.resize(c.n_layers);
  const int rows = static_cast<int>(s.item_first_row[batch.size()]);
  const int hidden = c.hidden_size, inter = c.intermediate_size, hd = c.head_dim;
  const size_t q_dim = size_t(c.n_heads) * hd, kv_dim = size_t(c.n_kv_heads) * hd;
  const size_t half = hd / 2;

  for_rows(pool_, rows, [&](int first, int last) {
    for (int r = first; r < last; ++r) {
      const BatchItem& item = batch[s.row_item[r]];
      tensor_to_fp32(*weights_.embed, uint64_t(item.tokens[s.row_pos[r]]) * hidden, hidden, s.x.data() + size_t(r) * hidden);
    }
  });

  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& w = weights_.layers[l];
    const bool last = (l == c.n_layers - 1);

    // Attention block: norm, projections, rotary embeddings.
    for_rows(pool_, rows, [&](int first, int last_row) {
      for (int r = first; r < last_row; ++r)
        rmsnorm(s.x.data() + size_t(r) * hidden, w.attn_norm.data(), hidden, c.rms_norm_eps, s.xn.data() + size_t(r) * hidden);
    });
    matmul(pool_, s.xn.data(), hidden, rows, w.wq, s.q.data(), q_dim);
    matmul(pool_, s.xn.data(), hidden, rows, w.wk, s.k_new.data(), kv_dim);
    if (!last) matmul(pool_, s.xn.data(), hidden, rows, w.wv, s.v_new.data(), kv_dim);
    for_rows(pool_, rows, [&](int first, int last_row) {
      for (int r = first; r < last_row; ++r) {
        const float* cos_row = s.rope_cos.data() + size_t(s.row_pos[r]) * half;
        const float* sin_row = s.rope_sin.data() + size_t(s.row_pos[r]) * half;
        for (int h = 0; h < c.n_heads; ++h) apply_rope(s.q.data() + r * q_dim + size_t(h) * hd, hd, cos_row, sin_row);
        for (int g = 0; g < c.n_kv_heads; ++g) apply_rope(s.k_new.data() + r * kv_dim + size_t(g) * hd, hd, cos_row, sin_row);
      }
    });

    // Each item's keys and values: the shared prefix from the item before, then its new rows.
    // In item order, so a prefix copied from an item that itself copied it is already in place.
    for (size_t j = 0; j < batch.size(); ++j) {
      const BatchItem& item = batch[j];
      const size_t dst = s.item_start[j] * kv_dim, n_new = size_t(item.length - item.shared) * kv_dim;
      if (item.shared > 0) {
        const size_t n_shared = size_t(item.shared) * kv_dim;
        const float* src_keys = j == 0 ? s.carry_keys[l].data() : s.keys.data() + s.item_start[j - 1] * kv_dim;
        const float* src_values = j == 0 ? s.carry_values[l].data() : s.values.data() + s.item_start[j - 1] * kv_dim;
        std::memcpy(s.keys.data() + dst, src_keys, n_shared * sizeof(float));
        if (!last) std::memcpy(s.values.data() + dst, src_values, n_shared * sizeof(float));
      }
      const size_t at = dst + size_t(item.shared) * kv_dim, from = s.item_first_row[j] * kv_dim;
      std::memcpy(s.keys.data() + at, s.k_new.data() + from, n_new * sizeof(float));
      if (!last) std::memcpy(s.values.data() + at, s.v_new.data() + from, n_new * sizeof(float));
    }

    attention(batch, l, sink, !last);

    // Sink weights of shared positions come from the item before; then sum over queries after the sink.
    for (size_t j = 0; j < batch.size(); ++j) {
      const BatchItem& item = batch[j];
      float* mine = s.sink_weight.data() + s.item_start[j] * c.n_heads;
      if (item.shared > 0) {
        const float* src = j == 0 ? s.carry_sink[l].data() : s.sink_weight.data() + s.item_start[j - 1] * c.n_heads;
        std::memcpy(mine, src, size_t(item.shared) * c.n_heads * sizeof(float));
      }
      for (int h = 0; h < c.n_heads; ++h) {
        double sum = 0.0;
        for (int i = sink + 1; i < item.length; ++i) sum += mine[size_t(i) * c.n_heads + h];
        out[(j * c.n_layers + l) * c.n_heads + h] = sum;
      }
    }
    // Keep this layer's keys, values and sink weights of the last item for the next batch.
    {
      const size_t j = batch.size() - 1, length = size_t(batch[j].length);
      const float* keys = s.keys.data() + s.item_start[j] * kv_dim;
      const float* values = s.values.data() + s.item_start[j] * kv_dim;
      const float* sink_rows = s.sink_weight.data() + s.item_start[j] * c.n_heads;
      s.carry_keys[l].assign(keys, keys + length * kv_dim);
      if (!last) s.carry_values[l].assign(values, values + length * kv_dim);
      s.carry_sink[l].assign(sink_rows, sink_rows + length * c.n_heads);
    }
    if (last) break;  // nothing after the last layer's attention weights is needed

    matmul(pool_, s.att.data(), q_dim, rows, w.wo, s.proj.data(), hidden);
    for_rows(pool_, rows, [&](int first, int last_row) {
      for (size_t i = size_t(first) * hidden; i < size_t(last_row) * hidden; ++i) s.x[i] += s.proj[i];
      for (int r = first; r < last_row; ++r)
        rmsnorm(s.x.data() + size_t(r) * hidden, w.mlp_norm.data(), hidden, c.rms_norm_eps, s.xn.data() + size_t(r) * hidden);
    });
    matmul(pool_, s.xn.data(), hidden, rows, w.w_gate, s.gate.data(), inter);
    matmul(pool_, s.xn.data(), hidden, rows, w.w_up, s.up.data(), inter);
    for_rows(pool_, rows, [&](int first, int last_row) {
      silu_mul(s.gate.data() + size_t(first) * inter, s.up.data() + size_t(first) * inter, size_t(last_row - first) * inter);
    });
    matmul(pool_, s.gate.data(), inter, rows, w.w_down, s.proj.data(), hidden);
    for_rows(pool_, rows, [&](int first, int last_row) {
      for (size_t i = size_t(first) * hidden; i < size_t(last_row) * hidden; ++i) s.x[i] += s.proj[i];
    });
  }
  const BatchItem& tail = batch.back();
  s.carry_tokens.assign(tail.tokens, tail.tokens + tail.length);
}

}  // namespace sinkcheck
