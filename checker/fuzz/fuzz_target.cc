// libFuzzer-style target for the checker's parsers: every input must parse or throw CheckError.
//   clang:  clang++ -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -Ichecker checker/fuzz/fuzz_target.cc \
//             checker/json.cc checker/safetensors.cc checker/config.cc checker/rope.cc -o fuzz_parsers
//   g++ (no libFuzzer): add checker/fuzz/replay_main.cc and -fsanitize=address,undefined to replay a corpus.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "config.h"
#include "errors.h"
#include "json.h"
#include "safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    sinkcheck::parse_safetensors(data, size, "<fuzz>");
  } catch (const sinkcheck::CheckError&) {
  }
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    sinkcheck::Json doc = sinkcheck::parse_json(text, "<fuzz>");
    sinkcheck::model_config_from_json(doc, "<fuzz>");
  } catch (const sinkcheck::CheckError&) {
  }
  return 0;
}
