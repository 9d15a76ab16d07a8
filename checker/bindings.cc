// Python bindings (module sinkcheck._core): the checker's C++ core as the CLI and tests see it.
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>

#include "errors.h"
#include "json.h"
#include "model.h"
#include "safetensors.h"
#include "sinks.h"

namespace py = pybind11;
using namespace sinkcheck;

namespace {

py::list to_rows(const std::vector<double>& flat, int n_layers, int n_heads) {
  py::list rows;
  for (int l = 0; l < n_layers; ++l) {
    py::list row;
    for (int h = 0; h < n_heads; ++h) row.append(flat[size_t(l) * n_heads + h]);
    rows.append(row);
  }
  return rows;
}

py::dict config_dict(const ModelConfig& c) {
  py::dict d;
  d["family"] = family_name(c.family);  // the model_type
  d["n_layers"] = c.n_layers;
  d["n_heads"] = c.n_heads;
  d["n_kv_heads"] = c.n_kv_heads;
  d["head_dim"] = c.head_dim;
  d["hidden_size"] = c.hidden_size;
  d["vocab_size"] = c.vocab_size;
  d["sliding_window"] = c.sliding_window;
  py::list ropes;
  for (int l = 0; l < c.n_layers; ++l) {
    const Rope& rope = c.ropes[c.layer_rope[l]];
    py::dict r;
    r["rotary_dim"] = rope.rotary_dim;
    r["inv_freq"] = rope.inv_freq;
    r["attention_scaling"] = rope.attention_scaling;
    ropes.append(r);
  }
  d["rope"] = ropes;  // per layer
  d["attn_scale"] = c.attn_scale;
  d["embed_scale"] = c.embed_scale;
  return d;
}

// Wraps a Python progress callable; it also polls for Ctrl-C, which cannot arrive while the GIL is released.
Progress python_progress(const py::object& callback) {
  return [callback](long long done, long long total, int steps_done, int steps_total) {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    if (!callback.is_none()) callback(done, total, steps_done, steps_total);
  };
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "C++ core of sinkcheck: strict safetensors reader, decoder forward pass (Llama, Mistral, Qwen2, Qwen3, "
          "Gemma 3, Phi-3, OLMo 2), sink statistics.";
  py::register_exception<CheckError>(m, "CheckError");

  m.def(
      "read_metadata",
      [](const std::string& path) {
        Checkpoint checkpoint(path);
        py::dict out;
        for (const auto& [key, value] : checkpoint.metadata())
          if (!out.contains(key)) out[py::str(key)] = value;
        return out;
      },
      py::arg("path"), "The __metadata__ of a checkpoint (file, folder or shard index), first shard winning.");

  m.def(
      "checkpoint_directory", [](const std::string& path) { return Checkpoint(path).directory(); }, py::arg("path"),
      "The folder holding config.json and the tokenizer files for a checkpoint path.");

  m.def(
      "read_tensor",
      [](const std::string& path, const std::string& name) {
        Checkpoint checkpoint(path);
        const TensorEntry* entry = checkpoint.find(name);
        if (!entry) throw CheckError("missing tensor '" + name + "' in " + path);
        return py::make_tuple(tensor_to_fp32(checkpoint.require(name, entry->shape)), entry->shape);
      },
      py::arg("path"), py::arg("name"), "A tensor converted to fp32 as the model loader converts it: (values, shape).");

  m.def(
      "check_safetensors",
      [](py::bytes data) {
        std::string bytes = data;
        SafetensorsHeader header =
            parse_safetensors(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "<bytes>");
        return header.tensors.size();
      },
      py::arg("data"), "Validates a whole safetensors image held in memory; returns its tensor count.");

  m.def(
      "check_json", [](py::bytes data) { parse_json(std::string(data), "<json>"); }, py::arg("data"),
      "Parses JSON with the checker's strict parser (raises CheckError when invalid).");

  m.def(
      "check_config", [](py::bytes data) { return config_dict(model_config_from_json(parse_json(std::string(data), "<config>"), "<config>")); },
      py::arg("data"), "Reads a config.json text as the model loader would.");

  py::class_<Model>(m, "Model")
      .def(py::init([](const std::string& path, int threads) {
             py::gil_scoped_release release;
             return new Model(path, threads);
           }),
           py::arg("path"), py::arg("threads") = 0)
      .def_property_readonly("config", [](const Model& model) { return config_dict(model.config()); })
      .def_property_readonly("n_threads", &Model::n_threads)
      .def(
          "check_finite",
          [](Model& model) {
            py::gil_scoped_release release;
            model.check_finite();
          },
          "Reads every floating-point tensor of the checkpoint, streamed in chunks; raises CheckError naming the "
          "first NaN or infinity (tensor and element). Once per model; the audits call it first.")
      .def(
          "mean_sink_values",
          [](Model& model, const std::vector<Sequence>& sequences, int sink_position, bool reuse_prefixes,
             int batch_tokens, long long max_pass_rows) {
            SinkMeans means;
            {
              py::gil_scoped_release release;
              means = mean_sink_values(model, sequences, sink_position, "probe", nullptr,
                                       RunOptions{reuse_prefixes, std::max(batch_tokens, 1), max_pass_rows});
            }
            return py::make_tuple(to_rows(means.mean, means.n_layers, means.n_heads), means.n_sequences);
          },
          py::arg("sequences"), py::arg("sink_position") = 0, py::arg("reuse_prefixes") = true,
          py::arg("batch_tokens") = 512, py::arg("max_pass_rows") = 0,
          "a_h(X) per layer and query head, and the number of sequences that counted. max_pass_rows: new "
          "token rows per pass through the layers (0: as many as fit in 256 MB of residual stream).")
      .def(
          "sink_divergence",
          [](Model& model, const std::vector<Sequence>& harmful, const std::vector<Sequence>& harmless,
             int sink_position, py::object progress, bool reuse_prefixes, long long max_pass_rows) {
            SinkDivergence result;
            const Progress report = python_progress(progress);  // built (and later destroyed) holding the GIL
            {
              py::gil_scoped_release release;
              result = sink_divergence(model, harmful, harmless, sink_position, report,
                                       RunOptions{reuse_prefixes, 512, max_pass_rows});
            }
            const int L = result.harmful.n_layers, H = result.harmful.n_heads;
            py::dict out;
            out["sink_position"] = sink_position;
            out["divergence"] = to_rows(result.divergence, L, H);
            out["positive"] = result.positive;
            out["harmful_sink"] = to_rows(result.harmful.mean, L, H);
            out["harmless_sink"] = to_rows(result.harmless.mean, L, H);
            out["n_harmful"] = result.harmful.n_sequences;
            out["n_harmless"] = result.harmless.n_sequences;
            return out;
          },
          py::arg("harmful"), py::arg("harmless"), py::arg("sink_position") = 0, py::arg("progress") = py::none(),
          py::arg("reuse_prefixes") = true, py::arg("max_pass_rows") = 0,
          "d_h = a_h(harmful) - a_h(harmless); progress(done, total, layers_done, layers_total) is called after "
          "each batch of each layer (done and total count token rows x layers).");
}
