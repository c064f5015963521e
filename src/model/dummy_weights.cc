// MakeDummyWeights: random weights for any config, for speed tests without a checkpoint.
// Values come from a counter-based generator (a hash of seed, tensor and element index), so they
// are the same for any thread count; normals come from a 64K-entry inverse-CDF table.
#include <sys/mman.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include <fmt/format.h>

#include "model/weights.h"

namespace qilin {
namespace {

constexpr int kTableBits = 16;
constexpr int kTableSize = 1 << kTableBits;

// Quantiles of N(0, 1) at the midpoints (i + 0.5) / 65536, by bisection on the CDF: tails reach
// +-4.3 sigma, steps near 0 are 4e-5 sigma.
const std::vector<float>& NormalQuantiles() {
  static const std::vector<float> table = [] {
    std::vector<float> t(kTableSize);
#pragma omp parallel for schedule(static)
    for (int i = 0; i < kTableSize; ++i) {
      const double p = (i + 0.5) / kTableSize;
      double lo = -10.0, hi = 10.0;
      for (int it = 0; it < 48; ++it) {
        const double mid = 0.5 * (lo + hi);
        if (0.5 * std::erfc(-mid / std::sqrt(2.0)) < p) {
          lo = mid;
        } else {
          hi = mid;
        }
      }
      t[i] = static_cast<float>(0.5 * (lo + hi));
    }
    return t;
  }();
  return table;
}

// A zeroed buffer for a tensor. Large ones are anonymous mappings advised to use transparent huge
// pages: filling 15 GB (Qwen2.5-7B) through 4 KB pages took 3.7 M page faults, about a minute on a
// virtual machine where each fault costs ~15 us; with 2 MB pages it is 7,500.
std::shared_ptr<uint8_t> AllocateTensor(size_t bytes) {
  constexpr size_t kHuge = size_t{2} << 20;
  if (bytes >= 2 * kHuge) {
    const size_t len = (bytes + kHuge - 1) / kHuge * kHuge + kHuge;  // room to align to 2 MB
    void* base = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base != MAP_FAILED) {
      const uintptr_t b = reinterpret_cast<uintptr_t>(base);
      uint8_t* aligned = reinterpret_cast<uint8_t*>((b + kHuge - 1) / kHuge * kHuge);
      madvise(aligned, len - (aligned - static_cast<uint8_t*>(base)), MADV_HUGEPAGE);
      return std::shared_ptr<uint8_t>(aligned, [base, len](uint8_t*) { munmap(base, len); });
    }
  }
  return std::shared_ptr<uint8_t>(new uint8_t[bytes > 0 ? bytes : 1],
                                  std::default_delete<uint8_t[]>());
}

inline uint64_t Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

struct Builder {
  DType dtype;
  uint64_t seed;
  uint64_t next_id = 0;
  std::vector<std::shared_ptr<const void>> storage;

  // A tensor of `shape` with values mean + stddev * N(0, 1).
  TensorView Make(std::string name, std::vector<int64_t> shape, float mean, float stddev) {
    TensorView t;
    t.dtype = dtype;
    t.shape = std::move(shape);
    t.name = std::move(name);
    const int64_t n = t.numel();
    const size_t bytes = static_cast<size_t>(n) * DTypeSize(dtype);
    std::shared_ptr<uint8_t> buf = AllocateTensor(bytes);
    Fill(buf.get(), n, mean, stddev, next_id++);
    t.data = buf.get();
    storage.push_back(std::shared_ptr<const void>(buf, buf.get()));
    return t;
  }

  void Fill(uint8_t* out, int64_t n, float mean, float stddev, uint64_t id) const {
    switch (dtype) {
      case DType::kF32:
        return FillAs(reinterpret_cast<float*>(out), n, mean, stddev, id,
                      [](float v) { return v; });
      case DType::kF16:
        return FillAs(reinterpret_cast<uint16_t*>(out), n, mean, stddev, id,
                      [](float v) { return F32ToF16(v); });
      default:  // values are finite: round to nearest even without the NaN case
        return FillAs(reinterpret_cast<uint16_t*>(out), n, mean, stddev, id, [](float v) {
          uint32_t bits;
          std::memcpy(&bits, &v, 4);
          return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
        });
    }
  }

  // Four values per 64-bit hash (16 bits each index the quantile table).
  template <typename T, typename Convert>
  void FillAs(T* out, int64_t n, float mean, float stddev, uint64_t id, Convert convert) const {
    const float* table = NormalQuantiles().data();
    const uint64_t key = Mix64(seed ^ 0x9e3779b97f4a7c15ULL) ^ Mix64(id * 0xd1b54a32d192ed03ULL);
    const int64_t full = n / 4;
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < full; ++g) {
      const uint64_t h = Mix64(key + static_cast<uint64_t>(g));
      out[g * 4 + 0] = convert(mean + stddev * table[h & 0xffff]);
      out[g * 4 + 1] = convert(mean + stddev * table[(h >> 16) & 0xffff]);
      out[g * 4 + 2] = convert(mean + stddev * table[(h >> 32) & 0xffff]);
      out[g * 4 + 3] = convert(mean + stddev * table[h >> 48]);
    }
    uint64_t h = Mix64(key + static_cast<uint64_t>(full));
    for (int64_t i = full * 4; i < n; ++i, h >>= 16)
      out[i] = convert(mean + stddev * table[h & 0xffff]);
  }
};

Status CheckDims(const ModelConfig& c) {
  struct Dim {
    const char* name;
    int64_t value;
  };
  for (const Dim& d :
       {Dim{"vocab_size", c.vocab_size}, Dim{"hidden_size", c.hidden_size},
        Dim{"intermediate_size", c.intermediate_size}, Dim{"num_hidden_layers", c.num_layers},
        Dim{"num_attention_heads", c.num_heads}, Dim{"num_key_value_heads", c.num_kv_heads},
        Dim{"head_dim", c.head_dim}}) {
    if (d.value <= 0)
      return InvalidArgument("model config: {} = {} must be positive", d.name, d.value);
  }
  return Status::Ok();
}

}  // namespace

Result<ModelWeights> MakeDummyWeights(const ModelConfig& config, DType dtype, uint64_t seed) {
  return MakeDummyWeights(config, dtype, seed, 0.02f, 0.1f);
}

Result<ModelWeights> MakeDummyWeights(const ModelConfig& config, DType dtype, uint64_t seed,
                                      float matrix_std, float norm_std) {
  if (dtype != DType::kBF16 && dtype != DType::kF16 && dtype != DType::kF32) {
    return InvalidArgument("dummy weights: dtype {} is not supported (use BF16, F16 or F32)",
                           DTypeName(dtype));
  }
  QILIN_RETURN_IF_ERROR(CheckDims(config));
  const int64_t h = config.hidden_size, q = config.q_size(), kv = config.kv_size();
  const int64_t inter = config.intermediate_size;
  Builder b{dtype, seed, 0, {}};
  ModelWeights w;
  w.embed_tokens = b.Make("model.embed_tokens.weight", {config.vocab_size, h}, 0.0f, matrix_std);
  w.layers.resize(config.num_layers);
  for (int64_t i = 0; i < config.num_layers; ++i) {
    LayerWeights& l = w.layers[i];
    const std::string p = fmt::format("model.layers.{}.", i);
    l.input_norm = b.Make(p + "input_layernorm.weight", {h}, 1.0f, norm_std);
    l.q_proj = b.Make(p + "self_attn.q_proj.weight", {q, h}, 0.0f, matrix_std);
    l.k_proj = b.Make(p + "self_attn.k_proj.weight", {kv, h}, 0.0f, matrix_std);
    l.v_proj = b.Make(p + "self_attn.v_proj.weight", {kv, h}, 0.0f, matrix_std);
    if (config.attention_bias) {
      l.q_bias = b.Make(p + "self_attn.q_proj.bias", {q}, 0.0f, matrix_std);
      l.k_bias = b.Make(p + "self_attn.k_proj.bias", {kv}, 0.0f, matrix_std);
      l.v_bias = b.Make(p + "self_attn.v_proj.bias", {kv}, 0.0f, matrix_std);
    }
    if (config.qk_norm) {
      l.q_norm = b.Make(p + "self_attn.q_norm.weight", {config.head_dim}, 1.0f, norm_std);
      l.k_norm = b.Make(p + "self_attn.k_norm.weight", {config.head_dim}, 1.0f, norm_std);
    }
    l.o_proj = b.Make(p + "self_attn.o_proj.weight", {h, q}, 0.0f, matrix_std);
    if (config.o_bias) l.o_bias = b.Make(p + "self_attn.o_proj.bias", {h}, 0.0f, matrix_std);
    l.post_attention_norm = b.Make(p + "post_attention_layernorm.weight", {h}, 1.0f, norm_std);
    l.gate_proj = b.Make(p + "mlp.gate_proj.weight", {inter, h}, 0.0f, matrix_std);
    l.up_proj = b.Make(p + "mlp.up_proj.weight", {inter, h}, 0.0f, matrix_std);
    l.down_proj = b.Make(p + "mlp.down_proj.weight", {h, inter}, 0.0f, matrix_std);
  }
  w.final_norm = b.Make("model.norm.weight", {h}, 1.0f, norm_std);
  if (config.tie_word_embeddings) {
    w.lm_head = w.embed_tokens;
  } else {
    w.lm_head = b.Make("lm_head.weight", {config.vocab_size, h}, 0.0f, matrix_std);
  }
  w.storage = std::move(b.storage);
  return w;
}

}  // namespace qilin
