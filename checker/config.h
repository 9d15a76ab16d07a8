// Hyper-parameters of a supported decoder-only model, read from the config.json beside the weights.
//
// Every family runs through the same layer loop (model.cc); what differs between families is data here:
// which norms a layer has and where, the norm convention, q/k norms, fused projections, the MLP's
// activation, scalings, and per layer its rotary embedding and sliding window.
#pragma once

#include <string>
#include <vector>

#include "json.h"

namespace sinkcheck {

enum class Family { Llama, Mistral, Qwen2, Qwen3, Gemma3, Phi3, Olmo2 };

const char* family_name(Family family);  // the config's model_type ("gemma3_text" for Gemma 3)

// The MLP is down(act(gate) * up) with this act.
enum class Activation { Silu, GeluTanh };

// RMSNorm of queries and keys after their projections, before RoPE: over each head's head_dim values
// (Qwen3, Gemma 3) or over the whole projection, all heads together (OLMo 2).
enum class QkNorm { None, PerHead, Whole };

// One rotary embedding. Position p turns dims i and i + rotary_dim/2 of a head by p * inv_freq[i]; dims from
// rotary_dim on are left alone (partial rotary, Phi-3). cos and sin are multiplied by attention_scaling
// (longrope; 1 otherwise).
struct Rope {
  std::vector<float> inv_freq;  // rotary_dim / 2 values, as transformers computes them
  int rotary_dim = 0;
  float attention_scaling = 1.0f;
  // Longrope: these (short-factor) frequencies hold for sequences up to this length; transformers switches to
  // other frequencies for longer ones, for a whole batch at once, so longer probes are refused. 0: no limit.
  int max_length = 0;
};

// Tensor names (under model.layers.N.) of a layer's RMSNorms, "" where the family has none:
//   x = x + attn_out(attention(attn_in(x)));  x = x + mlp_out(mlp(mlp_in(x)))
struct LayerNorms {
  std::string attn_in;   // before attention (input_layernorm; none in OLMo 2)
  std::string attn_out;  // on the attention output, before the residual add (Gemma 3, OLMo 2)
  std::string mlp_in;    // before the MLP (post_attention_layernorm in Llama; pre_feedforward_layernorm in Gemma 3)
  std::string mlp_out;   // on the MLP output, before the residual add (Gemma 3, OLMo 2)
};

struct ModelConfig {
  Family family = Family::Llama;
  std::string model_type;
  int hidden_size = 0;
  int intermediate_size = 0;
  int n_layers = 0;
  int n_heads = 0;     // query heads
  int n_kv_heads = 0;  // key/value heads (grouped-query attention when fewer than n_heads)
  int head_dim = 0;
  int vocab_size = 0;
  float rms_norm_eps = 1e-6f;
  bool tie_word_embeddings = false;

  // Layer structure.
  LayerNorms norms;
  float norm_offset = 0.0f;  // RMSNorms multiply by (norm_offset + weight): 1 in Gemma 3, 0 elsewhere
  QkNorm qk_norm = QkNorm::None;
  bool fused_qkv = false;      // self_attn.qkv_proj holds the q, k and v rows in that order (Phi-3)
  bool fused_gate_up = false;  // mlp.gate_up_proj holds the gate rows, then the up rows (Phi-3)
  bool qkv_bias = false;       // Qwen2 always; Llama, Qwen3, Gemma 3, OLMo 2 with attention_bias
  bool o_bias = false;         // with attention_bias
  bool mlp_bias = false;       // Llama with mlp_bias
  Activation activation = Activation::Silu;

  // Scalings.
  float embed_scale = 1.0f;  // embeddings are multiplied by this: sqrt(hidden_size) in Gemma 3
  float attn_scale = 0.0f;   // attention scores are q.k times this: head_dim^-0.5 (Gemma 3: query_pre_attn_scalar^-0.5)

  // Per layer.
  std::vector<Rope> ropes;          // the model's distinct rotary embeddings (Gemma 3: local and global)
  std::vector<int> layer_rope;      // per layer: index into ropes
  std::vector<int> sliding_window;  // per layer: keys visible are i - w < j <= i; 0 = full causal
};

// Reads and checks config.json; an unsupported architecture, activation, RoPE variant or any other field value
// the forward pass does not implement is a CheckError.
ModelConfig read_model_config(const std::string& path);
ModelConfig model_config_from_json(const Json& doc, const std::string& label);

}  // namespace sinkcheck
