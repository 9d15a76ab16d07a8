// Strict safetensors reader: memory-mapped files, every header field validated before use.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace sinkcheck {

enum class DType { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);
// Whether the dtype holds floating-point values (F64, F32, F16, BF16, F8_E5M2, F8_E4M3), which can be NaN
// or infinite; the integer and bool dtypes cannot.
bool is_float(DType dtype);

struct TensorEntry {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t numel = 0;
  const uint8_t* data = nullptr;  // first byte, inside the mapped file
  uint64_t nbytes = 0;
  std::string file;     // for messages
  bool mapped = false;  // data lies in a read-only file mapping (Checkpoint), so page hints apply
};

struct SafetensorsHeader {
  std::vector<TensorEntry> tensors;
  std::vector<std::pair<std::string, std::string>> metadata;  // the "__metadata__" map
};

// Parses and validates a whole safetensors image held in memory: header length inside the image,
// strict JSON, known dtypes, shapes of non-negative ints, offsets inside the data area with
// begin <= end, byte length = numel x dtype size, no two tensors overlapping. Entry pointers point
// into `bytes`. `label` names the file in messages.
SafetensorsHeader parse_safetensors(const uint8_t* bytes, size_t size, const std::string& label);

// A read-only memory map of a whole file.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// A checkpoint: one .safetensors file, a folder (index, model.safetensors, or all its shards) or a
// model.safetensors.index.json. Tensor names are unique across shards.
class Checkpoint {
 public:
  explicit Checkpoint(const std::string& path);

  const std::string& directory() const { return directory_; }  // where config.json and tokenizer files live
  const TensorEntry* find(const std::string& name) const;
  // The tensor, checked to be present, floating point (F32, F16, BF16) and of the given shape.
  const TensorEntry& require(const std::string& name, const std::vector<int64_t>& shape) const;
  // The __metadata__ value for `key`, from the first shard that has it.
  std::optional<std::string> metadata_value(const std::string& key) const;
  const std::vector<std::pair<std::string, std::string>>& metadata() const { return metadata_; }
  // Every tensor of every shard, in file order: shard by shard as they were opened, by data offset within one.
  const std::vector<const TensorEntry*>& tensors() const { return order_; }

 private:
  void add_file(const std::string& path);

  std::string directory_;
  std::vector<std::unique_ptr<MappedFile>> files_;
  std::unordered_map<std::string, TensorEntry> tensors_;
  std::vector<const TensorEntry*> order_;  // into tensors_ (its elements do not move)
  std::vector<std::pair<std::string, std::string>> metadata_;
};

// Converts `count` elements starting at element `first` of an F32/F16/BF16 tensor to fp32.
void tensor_to_fp32(const TensorEntry& tensor, uint64_t first, uint64_t count, float* out);
std::vector<float> tensor_to_fp32(const TensorEntry& tensor);

// As tensor_to_fp32, but a NaN or infinity in the range is a CheckError that names the tensor and the
// element's index: a broken checkpoint stops the audit instead of turning heads into NaN.
void tensor_to_fp32_finite(const TensorEntry& tensor, uint64_t first, uint64_t count, float* out);
std::vector<float> tensor_to_fp32_finite(const TensorEntry& tensor);

// Index of the first NaN or infinity in x[0..n), or n when all are finite.
size_t first_non_finite(const float* x, size_t n);

// The same over elements [first, first + count) of a floating-point tensor of any dtype (is_float), read
// from the stored bits without converting them: the offset in the range of the first NaN or infinity, or
// count when all are finite. Non-float tensors have none.
uint64_t first_non_finite(const TensorEntry& tensor, uint64_t first, uint64_t count);

// The CheckError for element `element` (flat index) of a tensor, which is NaN or infinite: names the file,
// the tensor, the value (NaN, +inf, -inf) and the element's index in the tensor's shape.
[[noreturn]] void throw_non_finite(const TensorEntry& tensor, uint64_t element);

// Page-cache hints for a tensor's bytes in its mapped file: prefetch() asks the kernel to read them
// ahead (MADV_WILLNEED); release() drops this process's mapping of them (MADV_DONTNEED), so pages of
// layers already converted stop counting in the resident set. The data stays valid: a later read
// faults the pages back in from the file. Tensors not backed by a mapped file are left alone.
void prefetch(const TensorEntry& tensor);
void release(const TensorEntry& tensor);
// The same for elements [first, first + count) of a tensor (one part of a fused projection).
void prefetch(const TensorEntry& tensor, uint64_t first, uint64_t count);
void release(const TensorEntry& tensor, uint64_t first, uint64_t count);

std::string shape_string(const std::vector<int64_t>& shape);

}  // namespace sinkcheck
