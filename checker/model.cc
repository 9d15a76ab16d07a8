#include "model.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <mutex>

#include "errors.h"
#include "rope.h"

namespace sinkcheck {

namespace {

std::string layer_name(int layer, const std::string& suffix) {
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

[[noreturn]] void non_finite_activations(int layer, const char* what) {
  throw CheckError("layer " + std::to_string(layer) + ": " + what +
                   " became non-finite although every weight read so far is finite (the activations overflow "
                   "fp32): the checkpoint is broken, no divergence can be computed from it");
}

}  // namespace

Model::Model(const std::string& path, int n_threads)
    : checkpoint_(path),
      config_(read_model_config((std::filesystem::path(checkpoint_.directory()) / "config.json").string())),
      pool_(n_threads) {
  find_tensors();
}

void Model::find_tensors() {
  const ModelConfig& c = config_;
  const int64_t hidden = c.hidden_size, q_dim = int64_t(c.n_heads) * c.head_dim,
                kv_dim = int64_t(c.n_kv_heads) * c.head_dim, inter = c.intermediate_size;

  // Embeddings: tied models may store only one of the two matrices; the input side is what we need.
  const std::string embed_name =
      (!checkpoint_.find("model.embed_tokens.weight") && c.tie_word_embeddings && checkpoint_.find("lm_head.weight"))
          ? "lm_head.weight"
          : "model.embed_tokens.weight";
  embed_ = &checkpoint_.require(embed_name, {c.vocab_size, hidden});
  checkpoint_.require("model.norm.weight", {hidden});

  // Every tensor the config implies is checked here, before any compute. The last layer's value,
  // output and MLP weights are checked but never computed with (check_finite() reads their values):
  // its attention weights depend only on q and k.
  auto vector = [&](int l, const std::string& name, int64_t size) -> const TensorEntry* {
    return name.empty() ? nullptr : &checkpoint_.require(layer_name(l, name) + ".weight", {size});
  };
  auto matrix = [&](int l, const char* name, int64_t out, int64_t in, bool has_bias) {
    MatrixSlice m;
    m.weight = &checkpoint_.require(layer_name(l, name) + ".weight", {out, in});
    m.bias = has_bias ? &checkpoint_.require(layer_name(l, name) + ".bias", {out}) : nullptr;
    m.rows = out;
    return m;
  };
  auto rows = [](MatrixSlice m, int64_t row0, int64_t n) {  // a part of a fused projection
    m.row0 = row0;
    m.rows = n;
    return m;
  };
  tensors_.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    LayerTensors& t = tensors_[l];
    t.attn_in = vector(l, c.norms.attn_in, hidden);
    t.attn_out = vector(l, c.norms.attn_out, hidden);
    t.mlp_in = vector(l, c.norms.mlp_in, hidden);
    t.mlp_out = vector(l, c.norms.mlp_out, hidden);
    if (c.fused_qkv) {
      const MatrixSlice qkv = matrix(l, "self_attn.qkv_proj", q_dim + 2 * kv_dim, hidden, c.qkv_bias);
      t.wq = rows(qkv, 0, q_dim);
      t.wk = rows(qkv, q_dim, kv_dim);
      t.wv = rows(qkv, q_dim + kv_dim, kv_dim);
    } else {
      t.wq = matrix(l, "self_attn.q_proj", q_dim, hidden, c.qkv_bias);
      t.wk = matrix(l, "self_attn.k_proj", kv_dim, hidden, c.qkv_bias);
      t.wv = matrix(l, "self_attn.v_proj", kv_dim, hidden, c.qkv_bias);
    }
    t.wo = matrix(l, "self_attn.o_proj", hidden, q_dim, c.o_bias);
    if (c.qk_norm != QkNorm::None) {
      const bool per_head = c.qk_norm == QkNorm::PerHead;
      t.q_norm = vector(l, "self_attn.q_norm", per_head ? c.head_dim : q_dim);
      t.k_norm = vector(l, "self_attn.k_norm", per_head ? c.head_dim : kv_dim);
    }
    if (c.fused_gate_up) {
      const MatrixSlice gate_up = matrix(l, "mlp.gate_up_proj", 2 * inter, hidden, c.mlp_bias);
      t.w_gate = rows(gate_up, 0, inter);
      t.w_up = rows(gate_up, inter, inter);
    } else {
      t.w_gate = matrix(l, "mlp.gate_proj", inter, hidden, c.mlp_bias);
      t.w_up = matrix(l, "mlp.up_proj", inter, hidden, c.mlp_bias);
    }
    t.w_down = matrix(l, "mlp.down_proj", hidden, inter, c.mlp_bias);
  }
}

void Model::check_finite() {
  if (finite_checked_) return;
  struct Chunk {
    const TensorEntry* tensor;
    uint64_t first, count;
  };
  std::vector<Chunk> chunks;
  for (const TensorEntry* t : checkpoint_.tensors()) {
    if (!is_float(t->dtype)) continue;
    const uint64_t step = kFiniteChunkBytes / dtype_size(t->dtype);
    for (uint64_t first = 0; first < t->numel; first += step)
      chunks.push_back(Chunk{t, first, std::min(step, t->numel - first)});
  }
  // Chunks run in order but finish in any: the lowest bad chunk wins, so the message does not depend on timing.
  // Chunks after a bad one already found are skipped.
  std::atomic<size_t> bad_chunk{chunks.size()};
  std::mutex mutex;
  uint64_t bad_element = 0;
  pool_.run(static_cast<int>(chunks.size()), [&](int i, int) {
    if (size_t(i) > bad_chunk.load(std::memory_order_relaxed)) return;
    const Chunk& chunk = chunks[i];
    const uint64_t bad = first_non_finite(*chunk.tensor, chunk.first, chunk.count);
    release(*chunk.tensor, chunk.first, chunk.count);
    if (bad == chunk.count) return;
    std::lock_guard<std::mutex> lock(mutex);
    if (size_t(i) < bad_chunk.load()) {
      bad_chunk.store(i);
      bad_element = chunk.first + bad;
    }
  });
  if (bad_chunk.load() < chunks.size()) throw_non_finite(*chunks[bad_chunk.load()].tensor, bad_element);
  finite_checked_ = true;
}

int Model::max_length() const {
  int limit = 0;
  for (const Rope& rope : config_.ropes)
    if (rope.max_length > 0 && (limit == 0 || rope.max_length < limit)) limit = rope.max_length;
  return limit;
}

// Converts one stored weight matrix (or rows of a fused one) to fp32 and packs it for matmul(), a panel per
// task: each task converts its kPanel rows into per-thread scratch (checking them finite), then packs them.
void Model::pack(PackedMatrix& dst, const MatrixSlice& m) {
  const int out = static_cast<int>(m.rows), in = static_cast<int>(m.weight->shape[1]);
  const uint64_t first = uint64_t(m.row0) * in;  // the slice's first element
  const int n_panels = (out + kPanel - 1) / kPanel;
  dst.out = out;
  dst.in = in;
  dst.panels.resize(size_t(n_panels) * in * kPanel);  // capacity is kept across layers
  if (m.bias) {
    dst.bias.resize(out);
    tensor_to_fp32_finite(*m.bias, m.row0, out, dst.bias.data());
  } else {
    dst.bias.clear();
  }
  ensure_size(state_.pack_scratch, size_t(pool_.size()) * kPanel * in);
  pool_.run(n_panels, [&](int p, int thread) {
    float* rows = state_.pack_scratch.data() + size_t(thread) * kPanel * in;
    const int n_rows = std::min(kPanel, out - p * kPanel);
    tensor_to_fp32_finite(*m.weight, first + uint64_t(p) * kPanel * in, uint64_t(n_rows) * in, rows);
    pack_panel(rows, n_rows, in, dst.panels.data() + size_t(p) * in * kPanel);
  });
  release(*m.weight, first, uint64_t(out) * in);
  if (m.bias) release(*m.bias, m.row0, out);
}

// An RMSNorm weight as the norm multiplies by it: norm_offset + weight, in fp32 (Gemma 3: 1 + weight.float()).
void Model::load_norm(std::vector<float>& dst, const TensorEntry* weight) {
  if (!weight) {
    dst.clear();
    return;
  }
  dst.resize(weight->numel);
  tensor_to_fp32_finite(*weight, 0, weight->numel, dst.data());
  if (config_.norm_offset != 0.0f)
    for (float& w : dst) w += config_.norm_offset;
  release(*weight);
}

void Model::prefetch_layer(int layer) const {
  if (layer >= config_.n_layers) return;
  const LayerTensors& t = tensors_[layer];
  const bool last = (layer == config_.n_layers - 1);
  auto vector = [](const TensorEntry* e) { if (e) prefetch(*e); };
  auto matrix = [](const MatrixSlice& m) {
    const uint64_t in = uint64_t(m.weight->shape[1]);
    prefetch(*m.weight, uint64_t(m.row0) * in, uint64_t(m.rows) * in);
    if (m.bias) prefetch(*m.bias, m.row0, m.rows);
  };
  for (const TensorEntry* e : {t.attn_in, t.q_norm, t.k_norm}) vector(e);
  matrix(t.wq);
  matrix(t.wk);
  if (last) return;
  for (const TensorEntry* e : {t.attn_out, t.mlp_in, t.mlp_out}) vector(e);
  for (const MatrixSlice* m : {&t.wv, &t.wo, &t.w_gate, &t.w_up, &t.w_down}) matrix(*m);
}

void Model::load_layer(int layer) {
  const LayerTensors& t = tensors_[layer];
  LayerWeights& w = weights_;
  const bool last = (layer == config_.n_layers - 1);
  load_norm(w.attn_in, t.attn_in);
  load_norm(w.q_norm, t.q_norm);
  load_norm(w.k_norm, t.k_norm);
  pack(w.wq, t.wq);
  pack(w.wk, t.wk);
  if (last) return;
  pack(w.wv, t.wv);
  pack(w.wo, t.wo);
  load_norm(w.attn_out, t.attn_out);
  load_norm(w.mlp_in, t.mlp_in);
  load_norm(w.mlp_out, t.mlp_out);
  pack(w.w_gate, t.w_gate);
  pack(w.w_up, t.w_up);
  pack(w.w_down, t.w_down);
}

void Model::prepare(const std::vector<BatchItem>& items, const std::vector<size_t>& batch_ends) {
  const ModelConfig& c = config_;
  RunState& s = state_;
  const size_t n_items = items.size();
  s.item_start.assign(n_items + 1, 0);
  s.item_first_row.assign(n_items + 1, 0);
  int max_length = 0;
  size_t max_rows = 0, max_positions = 0, begin = 0;
  for (size_t end : batch_ends) {
    size_t positions = 0;
    for (size_t j = begin; j < end; ++j) {
      s.item_start[j] = positions;
      positions += items[j].length;
      s.item_first_row[j + 1] = s.item_first_row[j] + (items[j].length - items[j].shared);
      max_length = std::max(max_length, items[j].length);
    }
    max_rows = std::max(max_rows, s.item_first_row[end] - s.item_first_row[begin]);
    max_positions = std::max(max_positions, positions);
    begin = end;
  }
  const size_t rows = s.item_first_row[n_items];
  const size_t q_dim = size_t(c.n_heads) * c.head_dim, kv_dim = size_t(c.n_kv_heads) * c.head_dim;
  ensure_size(s.x, rows * c.hidden_size);
  ensure_size(s.xn, max_rows * c.hidden_size);
  ensure_size(s.proj, max_rows * c.hidden_size);
  ensure_size(s.q, max_rows * q_dim);
  ensure_size(s.att, max_rows * q_dim);
  ensure_size(s.k_new, max_rows * kv_dim);
  ensure_size(s.v_new, max_rows * kv_dim);
  if (c.n_layers > 1) {
    ensure_size(s.gate, max_rows * c.intermediate_size);
    ensure_size(s.up, max_rows * c.intermediate_size);
  }
  ensure_size(s.keys, max_positions * kv_dim);
  ensure_size(s.values, max_positions * kv_dim);
  ensure_size(s.sink_weight, max_positions * c.n_heads);
  ensure_size(s.row_item, rows);
  ensure_size(s.row_pos, rows);
  for (size_t j = 0; j < n_items; ++j)
    for (int p = items[j].shared; p < items[j].length; ++p) {
      size_t r = s.item_first_row[j] + (p - items[j].shared);
      s.row_item[r] = static_cast<int>(j);
      s.row_pos[r] = p;
    }
  if (this->max_length() > 0 && max_length > this->max_length())
    throw CheckError("internal: a sequence is longer than the rotary embeddings hold for");
  if (max_length > s.rope_positions) {
    s.rope_cos.resize(c.ropes.size());
    s.rope_sin.resize(c.ropes.size());
    for (size_t k = 0; k < c.ropes.size(); ++k) rope_tables(c.ropes[k], max_length, s.rope_cos[k], s.rope_sin[k]);
    s.rope_positions = max_length;
  }
  ensure_size(s.scores, size_t(pool_.size()) * s.rope_positions);  // one row of rope_positions per thread
}

// The embedding row of every new row's token, converted and checked; the table's pages are then released.
void Model::embed_rows(const std::vector<BatchItem>& items) {
  RunState& s = state_;
  const int hidden = config_.hidden_size;
  const int rows = static_cast<int>(s.item_first_row[items.size()]);
  const float scale = config_.embed_scale;  // Gemma 3 multiplies embeddings by sqrt(hidden_size)
  for_rows(pool_, rows, [&](int first, int last) {
    for (int r = first; r < last; ++r) {
      const BatchItem& item = items[s.row_item[r]];
      float* row = s.x.data() + size_t(r) * hidden;
      tensor_to_fp32_finite(*embed_, uint64_t(item.tokens[s.row_pos[r]]) * hidden, hidden, row);
      if (scale != 1.0f)
        for (int i = 0; i < hidden; ++i) row[i] *= scale;
    }
  });
  release(*embed_);
}

// Causal (optionally sliding-window) softmax attention for every new row of the batch's items. Records
// A[i, sink] for each head and, unless this is the last layer, the attention output.
void Model::attention(const std::vector<BatchItem>& items, size_t first_item, size_t end_item, int layer, int sink,
                      bool need_output) {
  const ModelConfig& c = config_;
  RunState& s = state_;
  const int hd = c.head_dim, group = c.n_heads / c.n_kv_heads, window = c.sliding_window[layer];
  const size_t q_dim = size_t(c.n_heads) * hd, kv_dim = size_t(c.n_kv_heads) * hd;
  const float scale = c.attn_scale;
  const int n_items = static_cast<int>(end_item - first_item);
  const size_t row0 = s.item_first_row[first_item];

  pool_.run(n_items * c.n_heads, [&](int task, int thread) {
    const size_t j = first_item + task / c.n_heads;
    const int h = task % c.n_heads, g = h / group;
    const BatchItem& item = items[j];
    const float* keys = s.keys.data() + s.item_start[j] * kv_dim + size_t(g) * hd;
    const float* values = s.values.data() + s.item_start[j] * kv_dim + size_t(g) * hd;
    float* sink_row = s.sink_weight.data() + s.item_start[j] * c.n_heads;
    float* scores = s.scores.data() + size_t(thread) * s.rope_positions;
    for (int i = item.shared; i < item.length; ++i) {
      const size_t r = s.item_first_row[j] - row0 + (i - item.shared);  // row within the batch
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

// RMSNorm of `rows` rows of n values each (out may be in): rows of x, or of q or k split into norm groups.
void Model::rmsnorm_rows(const float* in, const std::vector<float>& weight, int rows, int n, float* out) {
  for_rows(pool_, rows, [&](int first, int last) {
    for (int r = first; r < last; ++r)
      rmsnorm(in + size_t(r) * n, weight.data(), n, config_.rms_norm_eps, out + size_t(r) * n);
  });
}

// One layer for the batch of items [first_item, end_item): its rows of the residual stream go
// through the layer; the items' sink sums for this layer go to out.
void Model::run_batch(const std::vector<BatchItem>& items, size_t first_item, size_t end_item, int l, int sink,
                      double* out) {
  const ModelConfig& c = config_;
  RunState& s = state_;
  const LayerWeights& w = weights_;
  const bool last = (l == c.n_layers - 1);
  const size_t row0 = s.item_first_row[first_item];
  const int rows = static_cast<int>(s.item_first_row[end_item] - row0);
  const int hidden = c.hidden_size, inter = c.intermediate_size, hd = c.head_dim;
  const size_t q_dim = size_t(c.n_heads) * hd, kv_dim = size_t(c.n_kv_heads) * hd;
  float* x = s.x.data() + row0 * hidden;

  // Attention block: norm (where the family has one before attention), q/k/v projections.
  const float* attn_input = x;
  if (!w.attn_in.empty()) {
    rmsnorm_rows(x, w.attn_in, rows, hidden, s.xn.data());
    attn_input = s.xn.data();
  }
  matmul(pool_, attn_input, hidden, rows, w.wq, s.q.data(), q_dim);
  matmul(pool_, attn_input, hidden, rows, w.wk, s.k_new.data(), kv_dim);
  if (!last) matmul(pool_, attn_input, hidden, rows, w.wv, s.v_new.data(), kv_dim);

  // q/k norms: over each head, or over the whole projection.
  if (c.qk_norm != QkNorm::None) {
    const bool per_head = c.qk_norm == QkNorm::PerHead;
    rmsnorm_rows(s.q.data(), w.q_norm, per_head ? rows * c.n_heads : rows, per_head ? hd : int(q_dim), s.q.data());
    rmsnorm_rows(s.k_new.data(), w.k_norm, per_head ? rows * c.n_kv_heads : rows, per_head ? hd : int(kv_dim),
                 s.k_new.data());
  }

  // Rotary embeddings: this layer's (Gemma 3: local or global), on the first rotary_dim dims of each head.
  const int rope = c.layer_rope[l], rotary_dim = c.ropes[rope].rotary_dim;
  const size_t half = rotary_dim / 2;
  for_rows(pool_, rows, [&](int first, int last_row) {
    for (int r = first; r < last_row; ++r) {
      const int pos = s.row_pos[row0 + r];
      const float* cos_row = s.rope_cos[rope].data() + size_t(pos) * half;
      const float* sin_row = s.rope_sin[rope].data() + size_t(pos) * half;
      for (int h = 0; h < c.n_heads; ++h)
        apply_rope(s.q.data() + r * q_dim + size_t(h) * hd, rotary_dim, cos_row, sin_row);
      for (int g = 0; g < c.n_kv_heads; ++g)
        apply_rope(s.k_new.data() + r * kv_dim + size_t(g) * hd, rotary_dim, cos_row, sin_row);
    }
  });

  // Each item's keys and values: the shared prefix from the item before (for the batch's first item:
  // the previous batch's last item, carried), then its new rows. In item order, so a prefix copied
  // from an item that itself copied it is already in place.
  for (size_t j = first_item; j < end_item; ++j) {
    const BatchItem& item = items[j];
    const size_t dst = s.item_start[j] * kv_dim, n_new = size_t(item.length - item.shared) * kv_dim;
    if (item.shared > 0) {
      const size_t n_shared = size_t(item.shared) * kv_dim;
      const bool carried = (j == first_item);
      const float* src_keys = carried ? s.carry_keys.data() : s.keys.data() + s.item_start[j - 1] * kv_dim;
      const float* src_values = carried ? s.carry_values.data() : s.values.data() + s.item_start[j - 1] * kv_dim;
      std::memcpy(s.keys.data() + dst, src_keys, n_shared * sizeof(float));
      if (!last) std::memcpy(s.values.data() + dst, src_values, n_shared * sizeof(float));
    }
    const size_t at = dst + size_t(item.shared) * kv_dim, from = (s.item_first_row[j] - row0) * kv_dim;
    std::memcpy(s.keys.data() + at, s.k_new.data() + from, n_new * sizeof(float));
    if (!last) std::memcpy(s.values.data() + at, s.v_new.data() + from, n_new * sizeof(float));
  }

  attention(items, first_item, end_item, l, sink, !last);

  // Sink weights of shared positions come from the item before; then sum over queries after the sink.
  for (size_t j = first_item; j < end_item; ++j) {
    const BatchItem& item = items[j];
    float* mine = s.sink_weight.data() + s.item_start[j] * c.n_heads;
    if (item.shared > 0) {
      const float* src = j == first_item ? s.carry_sink.data() : s.sink_weight.data() + s.item_start[j - 1] * c.n_heads;
      std::memcpy(mine, src, size_t(item.shared) * c.n_heads * sizeof(float));
    }
    for (int h = 0; h < c.n_heads; ++h) {
      double sum = 0.0;
      for (int i = sink + 1; i < item.length; ++i) sum += mine[size_t(i) * c.n_heads + h];
      if (!std::isfinite(sum)) non_finite_activations(l, "the attention weights");
      out[(j * c.n_layers + l) * c.n_heads + h] = sum;
    }
  }
  // This layer's keys, values and sink weights of the batch's last item, for the next batch.
  {
    const size_t j = end_item - 1, length = size_t(items[j].length);
    const float* keys = s.keys.data() + s.item_start[j] * kv_dim;
    const float* values = s.values.data() + s.item_start[j] * kv_dim;
    const float* sink_rows = s.sink_weight.data() + s.item_start[j] * c.n_heads;
    s.carry_keys.assign(keys, keys + length * kv_dim);
    if (!last) s.carry_values.assign(values, values + length * kv_dim);
    s.carry_sink.assign(sink_rows, sink_rows + length * c.n_heads);
  }
  if (last) return;  // nothing after the last layer's attention weights is needed

  // Output projection, its norm (where the family has one), the residual add, the MLP's input norm.
  matmul(pool_, s.att.data(), q_dim, rows, w.wo, s.proj.data(), hidden);
  for_rows(pool_, rows, [&](int first, int last_row) {
    for (int r = first; r < last_row; ++r) {
      float* proj = s.proj.data() + size_t(r) * hidden;
      float* row = x + size_t(r) * hidden;
      if (!w.attn_out.empty()) rmsnorm(proj, w.attn_out.data(), hidden, c.rms_norm_eps, proj);
      for (int i = 0; i < hidden; ++i) row[i] += proj[i];
      if (!w.mlp_in.empty()) rmsnorm(row, w.mlp_in.data(), hidden, c.rms_norm_eps, s.xn.data() + size_t(r) * hidden);
    }
  });

  // Gated MLP: down(act(gate) * up), its output norm (where the family has one), the residual add.
  const float* mlp_input = w.mlp_in.empty() ? x : s.xn.data();
  matmul(pool_, mlp_input, hidden, rows, w.w_gate, s.gate.data(), inter);
  matmul(pool_, mlp_input, hidden, rows, w.w_up, s.up.data(), inter);
  for_rows(pool_, rows, [&](int first, int last_row) {
    float* gate = s.gate.data() + size_t(first) * inter;
    const float* up = s.up.data() + size_t(first) * inter;
    const size_t n = size_t(last_row - first) * inter;
    if (c.activation == Activation::GeluTanh) gelu_tanh_mul(gate, up, n);
    else silu_mul(gate, up, n);
  });
  matmul(pool_, s.gate.data(), inter, rows, w.w_down, s.proj.data(), hidden);
  for_rows(pool_, rows, [&](int first, int last_row) {
    for (int r = first; r < last_row; ++r) {
      float* proj = s.proj.data() + size_t(r) * hidden;
      float* row = x + size_t(r) * hidden;
      if (!w.mlp_out.empty()) rmsnorm(proj, w.mlp_out.data(), hidden, c.rms_norm_eps, proj);
      for (int i = 0; i < hidden; ++i) row[i] += proj[i];
    }
  });
  if (first_non_finite(x, size_t(rows) * hidden) != size_t(rows) * hidden) non_finite_activations(l, "the hidden state");
}

void Model::sink_sums(const std::vector<BatchItem>& items, const std::vector<size_t>& batch_ends, int sink,
                      double* out, const LayerStep& step) {
  const ModelConfig& c = config_;
  if (items.empty()) return;
  if (batch_ends.empty() || batch_ends.back() != items.size())
    throw CheckError("internal: batches do not cover the pass");
  for (size_t b = 0, begin = 0; b < batch_ends.size(); begin = batch_ends[b++])
    if (batch_ends[b] <= begin) throw CheckError("internal: empty batch in pass");
  for (size_t j = 0; j < items.size(); ++j) {
    const BatchItem& item = items[j];
    const int previous_length = j == 0 ? 0 : items[j - 1].length;
    if (item.shared < 0 || item.shared > item.length || item.shared > previous_length)
      throw CheckError("internal: bad shared prefix in pass");
  }
  prepare(items, batch_ends);
  embed_rows(items);

  prefetch_layer(0);
  for (int l = 0; l < c.n_layers; ++l) {
    load_layer(l);
    prefetch_layer(l + 1);  // read ahead while this layer computes
    size_t begin = 0;
    for (size_t end : batch_ends) {
      run_batch(items, begin, end, l, sink, out);
      begin = end;
      if (step) step(l, static_cast<long long>(state_.item_first_row[end]));
    }
  }
}

}  // namespace sinkcheck
