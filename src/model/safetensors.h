// Safetensors files: a read-only mmap whose header is validated in full before any tensor data
// is touched, a writer, and sharded checkpoints (model.safetensors.index.json).
//
// Format: 8-byte little-endian header length N, N bytes of JSON
// {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the data; offsets are relative to the start of the data.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "model/weights.h"

namespace qilin {

// Header length limit, as the reference implementation: 100 MB.
inline constexpr uint64_t kMaxSafetensorsHeader = 100'000'000;

class SafetensorsFile {
 public:
  struct Entry {
    DType dtype;
    std::vector<int64_t> shape;
    uint64_t begin = 0;  // byte offsets into the data section
    uint64_t end = 0;
  };

  // Maps `path` read-only and validates the header: length, JSON object, metadata strings,
  // every tensor's dtype, shape (overflow-checked) and data_offsets (inside the data, size equal
  // to shape x dtype, no two tensors overlapping). Errors name the file and the tensor:
  // NotFound for a missing file, DataLoss for a truncated or corrupt one.
  static Result<std::shared_ptr<SafetensorsFile>> Open(const std::filesystem::path& path);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  // Tensor names, sorted.
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  size_t size() const { return entries_.size(); }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const Entry* entry(const std::string& name) const;

  // A view of the tensor's bytes in the mapping (valid while this object lives), or NotFound
  // naming the tensor and the file. The data pointer is as aligned as the file makes it.
  Result<TensorView> Find(const std::string& name) const;

 private:
  SafetensorsFile() = default;

  std::filesystem::path path_;
  const uint8_t* map_ = nullptr;
  size_t map_size_ = 0;
  const uint8_t* data_ = nullptr;  // start of the data section
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// One tensor to write; `data` (nbytes bytes, row-major) is not owned.
struct SafetensorsTensor {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t nbytes = 0;
};

// Writes a safetensors file (through a temporary file renamed into place). The header is padded
// with spaces to a multiple of 8 bytes so that data offsets keep 8-byte alignment; tensors are
// laid out in the given order. InvalidArgument for duplicate names or a size that is not
// shape x dtype.
Status WriteSafetensors(const std::filesystem::path& path,
                        const std::vector<SafetensorsTensor>& tensors,
                        const std::map<std::string, std::string>& metadata = {});

// All tensors of a checkpoint directory: `model.safetensors`, or the shards that
// `model.safetensors.index.json` names (each opened and validated once).
class SafetensorsCheckpoint {
 public:
  // NotFound when the directory has neither file or a shard is missing; InvalidArgument for a
  // malformed index or a shard path that leaves the directory (absolute, or with "..").
  static Result<SafetensorsCheckpoint> Open(const std::filesystem::path& model_dir);

  // The tensor's view, or NotFound naming the tensor (and the shard the index points at).
  Result<TensorView> Find(const std::string& name) const;
  bool contains(const std::string& name) const;
  // The file holding `name`, or nullptr.
  const SafetensorsFile* file_of(const std::string& name) const;
  // Every tensor name, sorted.
  std::vector<std::string> names() const;
  // The open files, to keep their mappings alive.
  const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }

 private:
  std::filesystem::path dir_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  // Tensor name -> index into files_.
  std::map<std::string, size_t> where_;
};

}  // namespace qilin
