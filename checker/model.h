// The forward pass of the supported decoder-only families (Llama incl. SmolLM2, Mistral, Qwen2, Qwen3,
// Gemma 3, Phi-3, OLMo 2), far enough to get attention weights: structs for config, weights and run state in
// the llama2.c manner. One layer loop serves every family; the differences are data in ModelConfig (which
// norms exist, q/k norms, fused projections, activation, scalings, per-layer rotary embedding and window).
//
// Memory does not grow with depth: the weights stay in the memory-mapped checkpoint in their stored
// dtype. A pass runs layer by layer over all of its sequences; each layer's tensors are converted to
// fp32 (and checked to be finite) into one set of reusable packed buffers when the pass reaches it,
// and that layer's pages of the mapped file are released before the next layer is read. Only the
// embedding rows of the probe tokens are converted from the vocabulary table. Before the first pass,
// check_finite() streams every float tensor of the checkpoint through a bounded chunk at a time, checking
// values only.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "config.h"
#include "kernels.h"
#include "safetensors.h"
#include "threads.h"

namespace sinkcheck {

// A weight matrix as stored: `rows` rows from row `row0` of a 2-D tensor (all of it, or one part of a
// fused projection such as Phi-3's qkv_proj), and the same rows of its bias (nullptr where there is none).
struct MatrixSlice {
  const TensorEntry* weight = nullptr;
  const TensorEntry* bias = nullptr;
  int64_t row0 = 0, rows = 0;
};

// One layer's tensors, validated (present, F32/F16/BF16, shape from config.json) when the model opens;
// they point into the mapped file. Norms are nullptr where the family has none (ModelConfig::norms).
struct LayerTensors {
  const TensorEntry *attn_in = nullptr, *attn_out = nullptr;  // RMSNorm weights around attention
  const TensorEntry *mlp_in = nullptr, *mlp_out = nullptr;    // and around the MLP
  const TensorEntry *q_norm = nullptr, *k_norm = nullptr;     // q/k RMSNorm weights (ModelConfig::qk_norm)
  MatrixSlice wq, wk, wv, wo;
  MatrixSlice w_gate, w_up, w_down;
};

// The fp32 weights of the layer being computed: one set of buffers, refilled for every layer. RMSNorm
// weights hold (norm_offset + weight), so every family's norm is x / rms(x) * weight; empty where none.
struct LayerWeights {
  std::vector<float> attn_in, attn_out, mlp_in, mlp_out;
  std::vector<float> q_norm, k_norm;
  PackedMatrix wq, wk, wv, wo;        // attention projections (with biases where the family has them)
  PackedMatrix w_gate, w_up, w_down;  // gated MLP; not loaded for the last layer, which needs only q and k
};

// One sequence of a pass. Its first `shared` tokens equal those of the item before it in the pass
// (0 for the first item): causal attention makes their keys, values and sink weights identical, so
// they are copied, not recomputed.
struct BatchItem {
  const int32_t* tokens = nullptr;
  int length = 0;
  int shared = 0;
};

// Activations for one pass. The residual stream holds every new row of the pass; the other buffers
// hold one batch and grow to the largest batch seen. Nothing is allocated per token or per layer.
struct RunState {
  std::vector<float> x;       // residual stream, one row per new (not shared) token of the pass
  std::vector<float> xn;      // normalised rows (batch)
  std::vector<float> q;       // queries, rows x (n_heads * head_dim)
  std::vector<float> k_new;   // keys of new rows
  std::vector<float> v_new;   // values of new rows
  std::vector<float> att;     // attention output, rows x (n_heads * head_dim)
  std::vector<float> proj;    // o_proj / down_proj output (normed in place where the family norms it)
  std::vector<float> gate;    // MLP gate, rows x intermediate
  std::vector<float> up;      // MLP up, rows x intermediate
  std::vector<float> keys;    // every position of every item of the batch, current layer
  std::vector<float> values;
  std::vector<float> sink_weight;  // A[i, sink] per item, head and position, current layer
  std::vector<float> scores;       // one attention row per thread
  std::vector<float> pack_scratch;  // per thread: kPanel weight rows converted to fp32 before packing
  std::vector<std::vector<float>> rope_cos, rope_sin;  // per rotary embedding of the config: position x rotary_dim/2
  int rope_positions = 0;
  std::vector<int> row_item, row_pos;    // which item and position each new row of the pass is
  std::vector<size_t> item_first_row;    // each item's first new row in the pass
  std::vector<size_t> item_start;        // offset of each item's positions in its batch's keys / sink_weight
  // The last item of the previous batch, current layer: what the next batch's first item shares.
  std::vector<float> carry_keys, carry_values, carry_sink;
};

// Called after each batch of each layer with the layer and the number of the pass's rows done in it.
using LayerStep = std::function<void(int layer, long long rows_done)>;

class Model {
 public:
  // Opens the checkpoint (file, folder or shard index), reads config.json beside it and checks every
  // tensor the config implies (presence, dtype, shape). Weights are read later, a layer at a time.
  // n_threads = 0: one per hardware thread.
  Model(const std::string& path, int n_threads);

  const ModelConfig& config() const { return config_; }
  const Checkpoint& checkpoint() const { return checkpoint_; }
  int n_threads() const { return pool_.size(); }
  int vocab_rows() const { return static_cast<int>(embed_->shape[0]); }
  // The longest sequence the rotary embeddings hold for (Rope::max_length), 0 when there is no limit.
  int max_length() const;

  // Reads every floating-point tensor of every shard (is_float: the LM head, the final norm, the layers the
  // statistic does not need and any tensor the config does not name too) and throws the CheckError of
  // throw_non_finite for the first NaN or infinity in file order. Streamed: chunks of at most kFiniteChunkBytes,
  // spread over the pool, each chunk's pages of the mapped file released once checked, so memory stays bounded
  // whatever the checkpoint's size. Runs once per Model; sink_divergence and mean_sink_values call it before
  // any compute, so no result comes from a checkpoint holding a non-finite value (surgery.py's rule).
  void check_finite();
  static constexpr uint64_t kFiniteChunkBytes = uint64_t(4) << 20;

  // One pass over `items`, split into batches: batch b is items [batch_ends[b-1], batch_ends[b]).
  // For each item, layer and query head: the sum over queries i = sink+1 .. length-1 of the attention
  // weight A[i, sink]; out[(item * n_layers + layer) * n_heads + head]. Token ids must already be
  // checked against vocab_rows(). A non-finite weight the pass reads, or activations that overflow,
  // are a CheckError naming the tensor or the layer.
  void sink_sums(const std::vector<BatchItem>& items, const std::vector<size_t>& batch_ends, int sink, double* out,
                 const LayerStep& step = nullptr);

 private:
  void find_tensors();
  void load_layer(int layer);
  void pack(PackedMatrix& dst, const MatrixSlice& matrix);
  void load_norm(std::vector<float>& dst, const TensorEntry* weight);
  void rmsnorm_rows(const float* in, const std::vector<float>& weight, int rows, int n, float* out);
  void prefetch_layer(int layer) const;
  void prepare(const std::vector<BatchItem>& items, const std::vector<size_t>& batch_ends);
  void embed_rows(const std::vector<BatchItem>& items);
  void run_batch(const std::vector<BatchItem>& items, size_t first_item, size_t end_item, int layer, int sink,
                 double* out);
  void attention(const std::vector<BatchItem>& items, size_t first_item, size_t end_item, int layer, int sink,
                 bool need_output);

  Checkpoint checkpoint_;
  ModelConfig config_;
  const TensorEntry* embed_ = nullptr;  // token embeddings, looked up row by row from the mapped file
  std::vector<LayerTensors> tensors_;
  LayerWeights weights_;  // the current layer's
  ThreadPool pool_;
  RunState state_;
  bool finite_checked_ = false;  // check_finite() has passed
};

}  // namespace sinkcheck
