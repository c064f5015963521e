#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>

#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include "model/json_util.h"

namespace qilin {
namespace {

using nlohmann::json;

// Largest index file we read (the biggest published ones are a few hundred KB).
constexpr uint64_t kMaxIndexBytes = 100'000'000;

bool IsUnsigned(const json& j) { return j.is_number_unsigned() || j.is_number_integer(); }

// A JSON integer that is >= 0, or -1 when it is not one.
int64_t NonNegative(const json& j) {
  if (j.is_number_unsigned()) {
    uint64_t u = j.get<uint64_t>();
    return u > static_cast<uint64_t>(INT64_MAX) ? -1 : static_cast<int64_t>(u);
  }
  if (j.is_number_integer()) return std::max<int64_t>(j.get<int64_t>(), -1);
  return -1;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

std::string KnownDtypes() {
  static constexpr DType kAll[] = {DType::kF32, DType::kF16,    DType::kBF16,
                                   DType::kI8,  DType::kU8,     DType::kI32,
                                   DType::kI64, DType::kF8E4M3, DType::kBool};
  std::string s;
  for (DType t : kAll) {
    if (!s.empty()) s += ", ";
    s += DTypeName(t);
  }
  return s;
}

Result<std::string> ReadSmallFile(const std::filesystem::path& path, uint64_t limit) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    return NotFound("{}: no such file", path.string());
  }
  uint64_t size = std::filesystem::file_size(path, ec);
  if (ec) return NotFound("{}: cannot stat: {}", path.string(), ec.message());
  if (size > limit) {
    return InvalidArgument("{}: file is {} bytes, over the limit {}", path.string(), size, limit);
  }
  std::ifstream in(path, std::ios::binary);
  std::string text(size, '\0');
  if (!in.read(text.data(), static_cast<std::streamsize>(size))) {
    return DataLoss("{}: read failed", path.string());
  }
  return text;
}

// A shard path from the index must name a file inside the model directory.
Status CheckShardPath(const std::string& shard, const std::string& source) {
  const std::filesystem::path p(shard);
  if (shard.empty() || p.is_absolute() || p.has_root_name() || p.has_root_directory()) {
    return InvalidArgument("{}: shard path '{}' must be relative to the model directory", source,
                           shard);
  }
  for (const auto& part : p) {
    if (part == "..") {
      return InvalidArgument("{}: shard path '{}' leaves the model directory ('..')", source,
                             shard);
    }
  }
  return Status::Ok();
}

}  // namespace

// ---- SafetensorsFile ----

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) munmap(const_cast<uint8_t*>(map_), map_size_);
}

Result<std::shared_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::filesystem::path& path) {
  const std::string file = path.string();
  int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT) return NotFound("{}: no such file", file);
    return FailedPrecondition("{}: cannot open: {}", file, std::strerror(err));
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return InvalidArgument("{}: not a regular file", file);
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return DataLoss("{}: file is {} bytes, too short for the 8-byte header length", file, size);
  }
  void* map = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) {
    return ResourceExhausted("{}: mmap of {} bytes failed: {}", file, size, std::strerror(errno));
  }
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->map_ = static_cast<const uint8_t*>(map);
  f->map_size_ = size;

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | f->map_[i];
  if (header_len > kMaxSafetensorsHeader) {
    return DataLoss("{}: header length {} is over the limit {}", file, header_len,
                    kMaxSafetensorsHeader);
  }
  if (header_len > size - 8) {
    return DataLoss("{}: header length {} is larger than the {} bytes after it (truncated file?)",
                    file, header_len, size - 8);
  }
  const std::string_view header(reinterpret_cast<const char*>(f->map_ + 8), header_len);
  f->data_ = f->map_ + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;

  // Depth 3: the root object, a tensor's object, its shape and offsets arrays.
  auto parsed = ParseJsonText(header, file + ": header", /*max_depth=*/3);
  if (!parsed.ok()) return DataLoss("{}", parsed.status().message());
  const json& root = *parsed;
  if (!root.is_object()) {
    return DataLoss("{}: header is a JSON {}, expected an object", file, JsonTypeName(root));
  }

  struct Span {
    uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Span> spans;
  for (const auto& [name, value] : root.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) {
        return DataLoss("{}: __metadata__ is a {}, expected an object of strings", file,
                        JsonTypeName(value));
      }
      for (const auto& [k, v] : value.items()) {
        if (!v.is_string()) {
          return DataLoss("{}: __metadata__ value '{}' is a {}, expected a string", file, k,
                          JsonTypeName(v));
        }
        f->metadata_[k] = v.get<std::string>();
      }
      continue;
    }
    if (!value.is_object()) {
      return DataLoss("{}: tensor '{}': entry is a {}, expected an object", file, name,
                      JsonTypeName(value));
    }
    auto dtype_it = value.find("dtype");
    auto shape_it = value.find("shape");
    auto offsets_it = value.find("data_offsets");
    if (dtype_it == value.end() || !dtype_it->is_string()) {
      return DataLoss("{}: tensor '{}': missing or non-string 'dtype'", file, name);
    }
    if (shape_it == value.end() || !shape_it->is_array()) {
      return DataLoss("{}: tensor '{}': missing or non-array 'shape'", file, name);
    }
    if (offsets_it == value.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
        !IsUnsigned((*offsets_it)[0]) || !IsUnsigned((*offsets_it)[1])) {
      return DataLoss("{}: tensor '{}': 'data_offsets' must be [begin, end] integers", file, name);
    }
    Entry e;
    const std::string dtype_name = dtype_it->get<std::string>();
    if (!ParseDType(dtype_name, &e.dtype)) {
      return InvalidArgument("{}: tensor '{}': unknown dtype '{}' (known: {})", file, name,
                             dtype_name, KnownDtypes());
    }
    int64_t numel = 1;
    for (const json& d : *shape_it) {
      int64_t dim = NonNegative(d);
      if (dim < 0) {
        return DataLoss(
            "{}: tensor '{}': shape {} has a dimension that is not a non-negative "
            "integer",
            file, name, shape_it->dump());
      }
      if (__builtin_mul_overflow(numel, dim, &numel)) {
        return DataLoss("{}: tensor '{}': shape {} overflows", file, name, shape_it->dump());
      }
      e.shape.push_back(dim);
    }
    int64_t nbytes;
    if (__builtin_mul_overflow(numel, static_cast<int64_t>(DTypeSize(e.dtype)), &nbytes)) {
      return DataLoss("{}: tensor '{}': shape {} overflows", file, name, shape_it->dump());
    }
    const int64_t b = NonNegative((*offsets_it)[0]), en = NonNegative((*offsets_it)[1]);
    if (b < 0 || en < 0 || b > en || static_cast<uint64_t>(en) > data_size) {
      return DataLoss(
          "{}: tensor '{}': data_offsets [{}, {}] out of range of the {}-byte data section", file,
          name, (*offsets_it)[0].dump(), (*offsets_it)[1].dump(), data_size);
    }
    e.begin = static_cast<uint64_t>(b);
    e.end = static_cast<uint64_t>(en);
    if (static_cast<int64_t>(e.end - e.begin) != nbytes) {
      return DataLoss("{}: tensor '{}': data_offsets span {} bytes but shape {} x {} needs {}",
                      file, name, e.end - e.begin, ShapeString(e.shape), dtype_name, nbytes);
    }
    auto [it, inserted] = f->entries_.emplace(name, std::move(e));
    if (it->second.end > it->second.begin)
      spans.push_back({it->second.begin, it->second.end, &it->first});
  }
  std::sort(spans.begin(), spans.end(),
            [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i].begin < spans[i - 1].end) {
      return DataLoss("{}: tensors '{}' [{}, {}) and '{}' [{}, {}) overlap", file,
                      *spans[i - 1].name, spans[i - 1].begin, spans[i - 1].end, *spans[i].name,
                      spans[i].begin, spans[i].end);
    }
  }
  return f;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& [name, e] : entries_) out.push_back(name);
  return out;
}

const SafetensorsFile::Entry* SafetensorsFile::entry(const std::string& name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second;
}

Result<TensorView> SafetensorsFile::Find(const std::string& name) const {
  const Entry* e = entry(name);
  if (e == nullptr) return NotFound("{}: no tensor '{}'", path_.string(), name);
  TensorView v;
  v.dtype = e->dtype;
  v.shape = e->shape;
  v.data = data_ + e->begin;
  v.name = name;
  return v;
}

// ---- WriteSafetensors ----

Status WriteSafetensors(const std::filesystem::path& path,
                        const std::vector<SafetensorsTensor>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const SafetensorsTensor& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__") {
      return InvalidArgument("{}: invalid tensor name '{}'", path.string(), t.name);
    }
    if (header.contains(t.name)) {
      return InvalidArgument("{}: tensor '{}' given twice", path.string(), t.name);
    }
    int64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0 || __builtin_mul_overflow(numel, d, &numel)) {
        return InvalidArgument("{}: tensor '{}': bad shape {}", path.string(), t.name,
                               ShapeString(t.shape));
      }
    }
    const uint64_t need = static_cast<uint64_t>(numel) * DTypeSize(t.dtype);
    if (t.nbytes != need || (need > 0 && t.data == nullptr)) {
      return InvalidArgument("{}: tensor '{}': {} bytes given, shape {} x {} needs {}",
                             path.string(), t.name, t.nbytes, ShapeString(t.shape),
                             DTypeName(t.dtype), need);
    }
    header[t.name] = {{"dtype", std::string(DTypeName(t.dtype))},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + need}}};
    offset += need;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(uint64_t{text.size()} >> (8 * i));

  const std::filesystem::path tmp = path.string() + fmt::format(".tmp{}", ::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return FailedPrecondition("{}: cannot create", tmp.string());
    out.write(reinterpret_cast<const char*>(len), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const SafetensorsTensor& t : tensors) {
      out.write(static_cast<const char*>(t.data), static_cast<std::streamsize>(t.nbytes));
    }
    out.flush();
    if (!out) {
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
      return ResourceExhausted("{}: write failed", tmp.string());
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    return FailedPrecondition("{}: cannot rename into place: {}", path.string(), ec.message());
  }
  return Status::Ok();
}

// ---- SafetensorsCheckpoint ----

Result<SafetensorsCheckpoint> SafetensorsCheckpoint::Open(const std::filesystem::path& model_dir) {
  SafetensorsCheckpoint ckpt;
  ckpt.dir_ = model_dir;
  const std::filesystem::path index_path = model_dir / "model.safetensors.index.json";
  const std::filesystem::path single_path = model_dir / "model.safetensors";
  std::error_code ec;
  if (std::filesystem::exists(index_path, ec)) {
    const std::string source = index_path.string();
    QILIN_ASSIGN_OR_RETURN(std::string text, ReadSmallFile(index_path, kMaxIndexBytes));
    QILIN_ASSIGN_OR_RETURN(json index, ParseJsonText(text, source));
    if (!index.is_object()) return InvalidArgument("{}: expected a JSON object", source);
    auto wm = index.find("weight_map");
    if (wm == index.end())
      return InvalidArgument("{}: required key 'weight_map' is missing", source);
    if (!wm->is_object()) {
      return InvalidArgument("{}: key 'weight_map': expected an object, got {}", source,
                             JsonTypeName(*wm));
    }
    std::map<std::string, size_t> shard_index;  // shard name -> files_ index
    for (const auto& [name, shard_json] : wm->items()) {
      if (!shard_json.is_string()) {
        return InvalidArgument("{}: weight_map['{}']: expected a file name, got {}", source, name,
                               JsonTypeName(shard_json));
      }
      const std::string shard = shard_json.get<std::string>();
      auto it = shard_index.find(shard);
      if (it == shard_index.end()) {
        QILIN_RETURN_IF_ERROR(CheckShardPath(shard, source));
        auto file = SafetensorsFile::Open(model_dir / shard);
        if (!file.ok()) {
          if (file.status().code() == StatusCode::kNotFound) {
            return NotFound("{}: shard '{}' (for tensor '{}') does not exist: {}", source, shard,
                            name, file.status().message());
          }
          return file.status();
        }
        ckpt.files_.push_back(*file);
        it = shard_index.emplace(shard, ckpt.files_.size() - 1).first;
      }
      if (!ckpt.files_[it->second]->contains(name)) {
        return DataLoss("{}: weight_map puts tensor '{}' in '{}', which has no such tensor", source,
                        name, shard);
      }
      ckpt.where_[name] = it->second;
    }
    if (ckpt.files_.empty()) return InvalidArgument("{}: weight_map is empty", source);
    // Tensors a shard holds but the index does not list are still reachable.
    for (size_t i = 0; i < ckpt.files_.size(); ++i) {
      for (const std::string& name : ckpt.files_[i]->names()) ckpt.where_.emplace(name, i);
    }
    return ckpt;
  }
  if (!std::filesystem::exists(single_path, ec)) {
    return NotFound("{}: no model.safetensors or model.safetensors.index.json", model_dir.string());
  }
  QILIN_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(single_path));
  ckpt.files_.push_back(file);
  for (const std::string& name : file->names()) ckpt.where_.emplace(name, 0);
  return ckpt;
}

bool SafetensorsCheckpoint::contains(const std::string& name) const {
  return where_.count(name) != 0;
}

const SafetensorsFile* SafetensorsCheckpoint::file_of(const std::string& name) const {
  auto it = where_.find(name);
  return it == where_.end() ? nullptr : files_[it->second].get();
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& [name, i] : where_) out.push_back(name);
  return out;
}

Result<TensorView> SafetensorsCheckpoint::Find(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) {
    return NotFound("{}: checkpoint has no tensor '{}'", dir_.string(), name);
  }
  return files_[it->second]->Find(name);
}

}  // namespace qilin
