#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "errors.h"
#include "json.h"

namespace sinkcheck {

namespace fs = std::filesystem;

namespace {

// The safetensors format caps the header at 100 MB; a larger length is a corrupt file.
constexpr uint64_t kMaxHeaderBytes = 100u * 1000u * 1000u;

struct DTypeInfo {
  const char* name;
  DType dtype;
  size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {"BOOL", DType::BOOL, 1}, {"U8", DType::U8, 1},     {"I8", DType::I8, 1},
    {"F8_E5M2", DType::F8_E5M2, 1}, {"F8_E4M3", DType::F8_E4M3, 1}, {"I16", DType::I16, 2},
    {"U16", DType::U16, 2},   {"F16", DType::F16, 2},   {"BF16", DType::BF16, 2},
    {"I32", DType::I32, 4},   {"U32", DType::U32, 4},   {"F32", DType::F32, 4},
    {"F64", DType::F64, 8},   {"I64", DType::I64, 8},   {"U64", DType::U64, 8},
};

const DTypeInfo& dtype_info(DType dtype) {
  for (const auto& info : kDTypes)
    if (info.dtype == dtype) return info;
  throw CheckError("internal: unknown dtype enum");
}

// Reads a non-negative JSON integer that must fit in uint64.
uint64_t read_count(const Json& value, const std::string& context) {
  if (!value.is_number() || !value.is_integer || value.integer < 0)
    throw CheckError(context + " must be a non-negative integer");
  return static_cast<uint64_t>(value.integer);
}

TensorEntry parse_entry(const std::string& name, const Json& spec, const uint8_t* data_area, uint64_t data_size,
                        const std::string& label) {
  const std::string where = label + ": tensor '" + name + "'";
  if (!spec.is_object()) throw CheckError(where + ": header entry is not an object");
  for (const auto& member : spec.members)
    if (member.first != "dtype" && member.first != "shape" && member.first != "data_offsets")
      throw CheckError(where + ": unknown header field '" + member.first + "'");
  const Json* dtype = spec.find("dtype");
  const Json* shape = spec.find("shape");
  const Json* offsets = spec.find("data_offsets");
  if (!dtype || !shape || !offsets) throw CheckError(where + ": header entry needs dtype, shape and data_offsets");

  TensorEntry entry;
  entry.name = name;
  entry.file = label;
  if (!dtype->is_string()) throw CheckError(where + ": dtype must be a string");
  const DTypeInfo* info = nullptr;
  for (const auto& candidate : kDTypes)
    if (dtype->string == candidate.name) info = &candidate;
  if (!info) throw CheckError(where + ": unknown dtype '" + dtype->string + "'");
  entry.dtype = info->dtype;

  if (!shape->is_array()) throw CheckError(where + ": shape must be an array");
  entry.numel = 1;
  for (const Json& dim : shape->items) {
    uint64_t extent = read_count(dim, where + ": shape entry");
    if (extent != 0 && entry.numel > std::numeric_limits<uint64_t>::max() / 16 / extent)
      throw CheckError(where + ": shape " + std::to_string(extent) + " overflows");
    entry.numel *= extent;
    entry.shape.push_back(static_cast<int64_t>(extent));
  }

  if (!offsets->is_array() || offsets->items.size() != 2)
    throw CheckError(where + ": data_offsets must be [begin, end]");
  uint64_t begin = read_count(offsets->items[0], where + ": data_offsets begin");
  uint64_t end = read_count(offsets->items[1], where + ": data_offsets end");
  if (begin > end)
    throw CheckError(where + ": data_offsets begin " + std::to_string(begin) + " is after end " + std::to_string(end));
  if (end > data_size)
    throw CheckError(where + ": data_offsets end " + std::to_string(end) + " is past the data area of " +
                     std::to_string(data_size) + " bytes (truncated file?)");
  entry.nbytes = end - begin;
  if (entry.nbytes != entry.numel * info->size)
    throw CheckError(where + ": byte length " + std::to_string(entry.nbytes) + " does not match shape " +
                     shape_string(entry.shape) + " x " + info->name + " (" + std::to_string(entry.numel * info->size) +
                     " bytes)");
  entry.data = data_area + begin;
  return entry;
}

std::string read_text_file(const std::string& path, const std::string& what) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) throw CheckError(what + " " + path + " is not a regular file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw CheckError("cannot read " + what + " " + path + ": " + std::strerror(errno));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// Half and bfloat16 to float by bit manipulation, exact for every value including subnormals.
float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  uint32_t bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {
    // Subnormal: value = mantissa x 2^-24, exact in float.
    float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &magnitude, 4);
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

}  // namespace

const char* dtype_name(DType dtype) { return dtype_info(dtype).name; }
size_t dtype_size(DType dtype) { return dtype_info(dtype).size; }

bool is_float(DType dtype) {
  switch (dtype) {
    case DType::F64:
    case DType::F32:
    case DType::F16:
    case DType::BF16:
    case DType::F8_E5M2:
    case DType::F8_E4M3:
      return true;
    default:
      return false;
  }
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

SafetensorsHeader parse_safetensors(const uint8_t* bytes, size_t size, const std::string& label) {
  if (size < 8) throw CheckError(label + ": file of " + std::to_string(size) + " bytes is too short for a safetensors header");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];  // little endian
  if (header_len > kMaxHeaderBytes)
    throw CheckError(label + ": header length " + std::to_string(header_len) + " exceeds the 100 MB limit");
  if (header_len > size - 8)
    throw CheckError(label + ": header length " + std::to_string(header_len) + " runs past the end of the " +
                     std::to_string(size) + "-byte file (truncated file?)");
  if (header_len < 2 || bytes[8] != '{') throw CheckError(label + ": header is not a JSON object");

  Json header = parse_json(std::string_view(reinterpret_cast<const char*>(bytes + 8), header_len), label + ": header");
  if (!header.is_object()) throw CheckError(label + ": header is not a JSON object");

  const uint8_t* data_area = bytes + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  SafetensorsHeader result;
  for (const auto& [name, spec] : header.members) {
    if (name == "__metadata__") {
      if (!spec.is_object()) throw CheckError(label + ": __metadata__ is not an object");
      for (const auto& [key, value] : spec.members) {
        if (!value.is_string()) throw CheckError(label + ": __metadata__ value for '" + key + "' is not a string");
        result.metadata.emplace_back(key, value.string);
      }
      continue;
    }
    if (name.empty()) throw CheckError(label + ": tensor with an empty name");
    result.tensors.push_back(parse_entry(name, spec, data_area, data_size, label));
  }

  // Overlap check on byte ranges sorted by start; empty tensors occupy nothing.
  std::vector<const TensorEntry*> order;
  for (const auto& entry : result.tensors)
    if (entry.nbytes > 0) order.push_back(&entry);
  std::sort(order.begin(), order.end(), [](const TensorEntry* a, const TensorEntry* b) { return a->data < b->data; });
  for (size_t i = 1; i < order.size(); ++i) {
    if (order[i]->data < order[i - 1]->data + order[i - 1]->nbytes)
      throw CheckError(label + ": tensors '" + order[i - 1]->name + "' and '" + order[i]->name + "' overlap");
  }
  return result;
}

MappedFile::MappedFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw CheckError("cannot open " + path + ": " + std::strerror(errno));
  struct stat info {};
  if (::fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    ::close(fd);
    throw CheckError(path + " is not a regular file");
  }
  size_ = static_cast<size_t>(info.st_size);
  if (size_ > 0) {
    void* mapped = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (mapped == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      throw CheckError("cannot map " + path + ": " + std::strerror(err));
    }
    data_ = static_cast<const uint8_t*>(mapped);
  }
  ::close(fd);  // the mapping stays valid
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

Checkpoint::Checkpoint(const std::string& path) {
  std::error_code ec;
  fs::path target(path);
  if (!fs::exists(target, ec)) throw CheckError("no such file or folder: " + path);

  fs::path index;
  std::vector<fs::path> shards;
  if (fs::is_directory(target, ec)) {
    directory_ = target.string();
    if (fs::exists(target / "model.safetensors.index.json")) {
      index = target / "model.safetensors.index.json";
    } else if (fs::exists(target / "model.safetensors")) {
      shards.push_back(target / "model.safetensors");
    } else {
      for (const auto& item : fs::directory_iterator(target, ec))
        if (item.path().extension() == ".safetensors") shards.push_back(item.path());
      std::sort(shards.begin(), shards.end());
      if (shards.empty()) throw CheckError("no .safetensors files in folder " + path);
    }
  } else {
    directory_ = target.parent_path().empty() ? std::string(".") : target.parent_path().string();
    if (target.extension() == ".json") index = target;
    else shards.push_back(target);
  }

  if (!index.empty()) {
    const std::string label = index.string();
    Json doc = parse_json(read_text_file(label, "shard index"), label);
    const Json* weight_map = doc.find("weight_map");
    if (!weight_map || !weight_map->is_object()) throw CheckError(label + ": no weight_map object");
    std::vector<std::string> names;
    for (const auto& [tensor, file] : weight_map->members) {
      if (!file.is_string()) throw CheckError(label + ": weight_map entry for '" + tensor + "' is not a file name");
      const std::string& shard = file.string;
      if (shard.empty() || shard.find('/') != std::string::npos || shard.find('\\') != std::string::npos || shard == "." || shard == "..")
        throw CheckError(label + ": shard name '" + shard + "' must be a plain file name in the index's folder");
      if (std::find(names.begin(), names.end(), shard) == names.end()) names.push_back(shard);
    }
    if (names.empty()) throw CheckError(label + ": weight_map is empty");
    for (const auto& shard : names) add_file((fs::path(directory_) / shard).string());
    for (const auto& [tensor, file] : weight_map->members) {
      auto found = tensors_.find(tensor);
      if (found == tensors_.end() || fs::path(found->second.file).filename() != file.string)
        throw CheckError(label + ": tensor '" + tensor + "' is not in shard " + file.string);
    }
  } else {
    for (const auto& shard : shards) add_file(shard.string());
  }
}

void Checkpoint::add_file(const std::string& path) {
  files_.push_back(std::make_unique<MappedFile>(path));
  const MappedFile& file = *files_.back();
  SafetensorsHeader header = parse_safetensors(file.data(), file.size(), path);
  std::vector<const TensorEntry*> mine;
  for (auto& entry : header.tensors) {
    entry.mapped = true;
    auto [it, inserted] = tensors_.emplace(entry.name, entry);
    if (!inserted) throw CheckError("tensor '" + entry.name + "' appears in both " + it->second.file + " and " + path);
    mine.push_back(&it->second);
  }
  std::sort(mine.begin(), mine.end(), [](const TensorEntry* a, const TensorEntry* b) { return a->data < b->data; });
  order_.insert(order_.end(), mine.begin(), mine.end());
  for (auto& item : header.metadata) metadata_.push_back(std::move(item));
}

const TensorEntry* Checkpoint::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

const TensorEntry& Checkpoint::require(const std::string& name, const std::vector<int64_t>& shape) const {
  const TensorEntry* entry = find(name);
  if (!entry) throw CheckError("missing tensor '" + name + "' in " + directory_);
  if (entry->dtype != DType::F32 && entry->dtype != DType::F16 && entry->dtype != DType::BF16)
    throw CheckError(entry->file + ": tensor '" + name + "' has unsupported dtype " + dtype_name(entry->dtype) +
                     " (sinkcheck reads F32, F16 and BF16)");
  if (entry->shape != shape)
    throw CheckError(entry->file + ": tensor '" + name + "' has shape " + shape_string(entry->shape) +
                     " but config.json implies " + shape_string(shape));
  return *entry;
}

std::optional<std::string> Checkpoint::metadata_value(const std::string& key) const {
  for (const auto& [k, v] : metadata_)
    if (k == key) return v;
  return std::nullopt;
}

void tensor_to_fp32(const TensorEntry& tensor, uint64_t first, uint64_t count, float* out) {
  if (first + count > tensor.numel) throw CheckError("internal: element range outside tensor " + tensor.name);
  const uint8_t* src = tensor.data + first * dtype_size(tensor.dtype);
  switch (tensor.dtype) {
    case DType::F32:
      std::memcpy(out, src, count * 4);  // memcpy: the data may be unaligned
      break;
    case DType::F16:
      for (uint64_t i = 0; i < count; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        out[i] = half_to_float(h);
      }
      break;
    case DType::BF16:
      for (uint64_t i = 0; i < count; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        uint32_t bits = static_cast<uint32_t>(h) << 16;
        std::memcpy(out + i, &bits, 4);
      }
      break;
    default:
      throw CheckError(tensor.file + ": tensor '" + tensor.name + "' has unsupported dtype " + dtype_name(tensor.dtype));
  }
}

std::vector<float> tensor_to_fp32(const TensorEntry& tensor) {
  std::vector<float> out(tensor.numel);
  tensor_to_fp32(tensor, 0, tensor.numel, out.data());
  return out;
}

size_t first_non_finite(const float* x, size_t n) {
  // Exponent bits all ones: infinity or NaN. The branch-free OR over blocks vectorizes; only a block
  // that has one is searched again.
  constexpr size_t kBlock = 1024;
  for (size_t start = 0; start < n; start += kBlock) {
    const size_t end = std::min(n, start + kBlock);
    uint32_t bad = 0;
    for (size_t i = start; i < end; ++i) {
      uint32_t bits;
      std::memcpy(&bits, x + i, 4);
      bad |= static_cast<uint32_t>((bits & 0x7F800000u) == 0x7F800000u);
    }
    if (bad)
      for (size_t i = start; i < end; ++i)
        if (!std::isfinite(x[i])) return i;
  }
  return n;
}

namespace {

// The first of `count` stored values (of type Bits, maybe unaligned) whose bits under `mask` are all ones:
// the exponent of a NaN or infinity. As above, a branch-free OR over blocks; only a block with one is searched.
template <typename Bits>
uint64_t first_all_ones(const uint8_t* src, uint64_t count, Bits mask) {
  constexpr uint64_t kBlock = 1024;
  auto special = [&](uint64_t i) {
    Bits bits;
    std::memcpy(&bits, src + i * sizeof(Bits), sizeof(Bits));
    return static_cast<uint32_t>(static_cast<Bits>(bits & mask) == mask);
  };
  for (uint64_t start = 0; start < count; start += kBlock) {
    const uint64_t end = std::min(count, start + kBlock);
    uint32_t bad = 0;
    for (uint64_t i = start; i < end; ++i) bad |= special(i);
    if (bad)
      for (uint64_t i = start; i < end; ++i)
        if (special(i)) return i;
  }
  return count;
}

}  // namespace

uint64_t first_non_finite(const TensorEntry& tensor, uint64_t first, uint64_t count) {
  if (first + count > tensor.numel) throw CheckError("internal: element range outside tensor " + tensor.name);
  const uint8_t* src = tensor.data + first * dtype_size(tensor.dtype);
  switch (tensor.dtype) {
    case DType::F64: return first_all_ones<uint64_t>(src, count, 0x7FF0000000000000ull);
    case DType::F32: return first_all_ones<uint32_t>(src, count, 0x7F800000u);
    case DType::F16: return first_all_ones<uint16_t>(src, count, 0x7C00u);
    case DType::BF16: return first_all_ones<uint16_t>(src, count, 0x7F80u);
    case DType::F8_E5M2: return first_all_ones<uint8_t>(src, count, 0x7Cu);
    case DType::F8_E4M3: return first_all_ones<uint8_t>(src, count, 0x7Fu);  // e4m3fn: no infinity, S.1111.111 is NaN
    default: return count;
  }
}

void throw_non_finite(const TensorEntry& tensor, uint64_t element) {
  // NaN or which infinity, from the stored bits (the exponent is all ones).
  const uint8_t* src = tensor.data + element * dtype_size(tensor.dtype);
  bool nan = true, negative = false;
  switch (tensor.dtype) {
    case DType::F64: {
      double value;
      std::memcpy(&value, src, 8);
      nan = std::isnan(value), negative = value < 0;
      break;
    }
    case DType::F32:
    case DType::F16:
    case DType::BF16: {
      float value;
      tensor_to_fp32(tensor, element, 1, &value);
      nan = std::isnan(value), negative = value < 0;
      break;
    }
    case DType::F8_E5M2:
      nan = (src[0] & 0x03u) != 0, negative = (src[0] & 0x80u) != 0;
      break;
    default:  // F8_E4M3 has no infinity
      break;
  }
  // The element's index in the tensor's shape, e.g. [12, 40].
  uint64_t flat = element;
  std::vector<int64_t> index(tensor.shape.size());
  for (size_t d = tensor.shape.size(); d-- > 0;) {
    const uint64_t extent = static_cast<uint64_t>(tensor.shape[d]);
    index[d] = static_cast<int64_t>(extent ? flat % extent : 0);
    flat = extent ? flat / extent : 0;
  }
  throw CheckError(tensor.file + ": tensor '" + tensor.name + "' holds a non-finite value (" +
                   (nan ? "NaN" : negative ? "-inf" : "+inf") + ") at " + shape_string(index) +
                   ": the checkpoint is broken, no divergence can be computed from it");
}

void tensor_to_fp32_finite(const TensorEntry& tensor, uint64_t first, uint64_t count, float* out) {
  tensor_to_fp32(tensor, first, count, out);
  const size_t bad = first_non_finite(out, count);
  if (bad != count) throw_non_finite(tensor, first + bad);
}

std::vector<float> tensor_to_fp32_finite(const TensorEntry& tensor) {
  std::vector<float> out(tensor.numel);
  tensor_to_fp32_finite(tensor, 0, tensor.numel, out.data());
  return out;
}

namespace {

void advise(const TensorEntry& tensor, uint64_t first, uint64_t count, int advice) {
  if (!tensor.mapped || tensor.nbytes == 0 || count == 0) return;
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const size_t size = dtype_size(tensor.dtype);
  const uintptr_t data = reinterpret_cast<uintptr_t>(tensor.data) + first * size;
  // Rounded outward to whole pages: a neighbour's page dropped too is simply read again when needed.
  const uintptr_t begin = data & ~(page - 1);
  const uintptr_t end = (data + count * size + page - 1) & ~(page - 1);
  ::madvise(reinterpret_cast<void*>(begin), end - begin, advice);  // a hint: failure changes nothing
}

}  // namespace

void prefetch(const TensorEntry& tensor) { advise(tensor, 0, tensor.numel, MADV_WILLNEED); }
void release(const TensorEntry& tensor) { advise(tensor, 0, tensor.numel, MADV_DONTNEED); }
void prefetch(const TensorEntry& tensor, uint64_t first, uint64_t count) {
  advise(tensor, first, count, MADV_WILLNEED);
}
void release(const TensorEntry& tensor, uint64_t first, uint64_t count) {
  advise(tensor, first, count, MADV_DONTNEED);
}

}  // namespace sinkcheck
