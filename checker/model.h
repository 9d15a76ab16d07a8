// The Llama-family forward pass (Llama incl. SmolLM2, Mistral, Qwen2), far enough to get attention
// weights: structs for config, weights and run state in the llama2.c manner.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "config.h"
#include "kernels.h"
#include "safetensors.h"
#include "threads.h"

namespace sinkcheck {

struct LayerWeights {
  std::vector<float> attn_norm;  // input_layernorm
  std::vector<float> mlp_norm;   // post_attention_layernorm
  PackedMatrix wq, wk, wv, wo;   // attention projections (with biases where the family has them)
  PackedMatrix w_gate, w_up, w_down;  // SwiGLU MLP; left empty in the last layer, which needs only q and k
};

struct Weights {
  const TensorEntry* embed = nullptr;  // token embeddings, looked up row by row from the mapped file
  std::vector<LayerWeights> layers;
};

// One sequence of a batch. Its first `shared` tokens equal those of the item before it (for the first
// item: the last item of the previous batch this model ran, see Model::carried_tokens): causal
// attention makes their keys, values and sink weights identical, so they are copied, not recomputed.
struct BatchItem {
  const int32_t* tokens = nullptr;
  int length = 0;
  int shared = 0;
};

// Activations for one batch. Buffers grow to the largest batch seen and are reused: nothing is
// allocated per token or per layer.
struct RunState {
  std::vector<float> x;       // residual stream, one row per new (not shared) token
  std::vector<float> xn;      // normalised rows
  std::vector<float> q;       // queries, rows x (n_heads * head_dim)
  std::vector<float> k_new;   // keys of new rows
  std::vector<float> v_new;   // values of new rows
  std::vector<float> att;     // attention output, rows x (n_heads * head_dim)
  std::vector<float> proj;    // o_proj / down_proj output
  std::vector<float> gate;    // MLP gate, rows x intermediate
  std::vector<float> up;      // MLP up, rows x intermediate
  std::vector<float> keys;    // every position of every item, current layer
  std::vector<float> values;
  std::vector<float> sink_weight;  // A[i, sink] per item, head and position, current layer
  std::vector<float> scores;       // one attention row per thread
  std::vector<float> rope_cos, rope_sin;
  int rope_positions = 0;
  std::vector<int> row_item, row_pos;    // which item and position each new row is
  std::vector<size_t> item_start;        // offset of each item's positions in keys / sink_weight
  std::vector<size_t> item_first_row;    // its first new row
  // The last item of the previous batch, kept so the next batch can share its prefix.
  std::vector<int32_t> carry_tokens;
  std::vector<std::vector<float>> carry_keys, carry_values, carry_sink;  // per layer
};

class Model {
 public:
  // Opens the checkpoint (file, folder or shard index), reads config.json beside it, checks every
  // tensor the config implies and loads them as fp32. n_threads = 0: one per hardware thread.
  Model(const std::string& path, int n_threads);

  const ModelConfig& config() const { return config_; }
  const Checkpoint& checkpoint() const { return checkpoint_; }
  int n_threads() const { return pool_.size(); }
  int vocab_rows() const { return static_cast<int>(weights_.embed->shape[0]); }

  // For each item, layer and query head: the sum over queries i = sink+1 .. length-1 of the
  // attention weight A[i, sink]. out[(item * n_layers + layer) * n_heads + head]. Token ids must
  // already be checked against vocab_rows().
  void sink_sums(const std::vector<BatchItem>& batch, int sink, double* out);

  // Tokens of the last item of the previous sink_sums call: what a first item's `shared` refers to.
  const std::vector<int32_t>& carried_tokens() const { return state_.carry_tokens; }

 private:
  void load_weights();
  void prepare(const std::vector<BatchItem>& batch);
  void attention(const std::vector<BatchItem>& batch, int layer, int sink, bool need_output);

  Checkpoint checkpoint_;
  ModelConfig config_;
  Weights weights_;
  ThreadPool pool_;
  RunState state_;
};

}  // namespace sinkcheck
