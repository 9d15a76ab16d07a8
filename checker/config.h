// Hyper-parameters of a Llama-family model, read from the config.json beside the weights.
#pragma once

#include <string>
#include <vector>

#include "json.h"

namespace sinkcheck {

enum class Family { Llama, Mistral, Qwen2 };

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
  bool qkv_bias = false;  // Qwen2 always; Llama with attention_bias
  bool o_bias = false;    // Llama with attention_bias
  bool mlp_bias = false;  // Llama with mlp_bias
  bool tie_word_embeddings = false;
  std::vector<float> rope_inv_freq;  // head_dim / 2 inverse frequencies, as transformers computes them
  std::vector<int> sliding_window;   // per layer: keys visible are i - w < j <= i; 0 = full causal
};

// Reads and checks config.json; an unsupported architecture, activation or RoPE variant is a CheckError.
ModelConfig read_model_config(const std::string& path);
ModelConfig model_config_from_json(const Json& doc, const std::string& label);

}  // namespace sinkcheck
