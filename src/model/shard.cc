#include "model/shard.h"

#include <algorithm>
#include <cstring>
#include <new>

#include <fmt/ranges.h>

namespace qilin {
namespace {

// The config.json key and value that hold the per-branch MLP width, for messages.
std::string IntermediateKey(const ModelConfig& c) {
  if (c.arch == ModelArch::kQwenV1) {
    return fmt::format("intermediate_size = {} (Qwen v1 stores both MLP branches; {} each)",
                       2 * c.intermediate_size, c.intermediate_size);
  }
  return fmt::format("intermediate_size = {}", c.intermediate_size);
}

Status CheckShape(const TensorView& t, const char* what, int64_t layer,
                  const std::vector<int64_t>& shape) {
  if (t.empty()) {
    return layer < 0 ? NotFound("sharding: tensor {} is missing", what)
                     : NotFound("sharding: tensor layers.{}.{} is missing", layer, what);
  }
  if (t.shape != shape) {
    return InvalidArgument("sharding: tensor {} ({}) has shape [{}], expected [{}]", what, t.name,
                           fmt::join(t.shape, ", "), fmt::join(shape, ", "));
  }
  return Status::Ok();
}

// Rows [row0, row0 + rows) of a row-major tensor, as a view.
TensorView RowSlice(const TensorView& t, int64_t row0, int64_t rows, int64_t rank) {
  TensorView v = t;
  int64_t row_elems = 1;
  for (size_t i = 1; i < t.shape.size(); ++i) row_elems *= t.shape[i];
  v.shape[0] = rows;
  v.data = rows == 0 ? nullptr
                     : static_cast<const uint8_t*>(t.data) + row0 * row_elems * DTypeSize(t.dtype);
  v.name = fmt::format("{} rows {}..{} (rank {})", t.name, row0, row0 + rows, rank);
  return v;
}

// Columns [col0, col0 + cols) of a row-major matrix, copied (only those bytes are read).
Result<TensorView> ColumnSlice(const TensorView& t, int64_t col0, int64_t cols, int64_t rank,
                               ModelWeights* out) {
  const int64_t rows = t.shape[0], ld = t.shape[1];
  const size_t es = DTypeSize(t.dtype);
  const size_t bytes = static_cast<size_t>(rows * cols) * es;
  std::shared_ptr<void> buf;
  try {
    buf.reset(::operator new(bytes == 0 ? 1 : bytes), [](void* p) { ::operator delete(p); });
  } catch (const std::bad_alloc&) {
    return ResourceExhausted("sharding: cannot allocate {} bytes for {} columns {}..{}", bytes,
                             t.name, col0, col0 + cols);
  }
  const uint8_t* src = static_cast<const uint8_t*>(t.data);
  uint8_t* dst = static_cast<uint8_t*>(buf.get());
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * cols * es, src + (r * ld + col0) * es, cols * es);
  }
  TensorView v = t;
  v.shape = {rows, cols};
  v.data = buf.get();
  v.name = fmt::format("{} columns {}..{} (rank {})", t.name, col0, col0 + cols, rank);
  out->storage.push_back(std::move(buf));
  return v;
}

}  // namespace

Status CheckShardable(const ModelConfig& c, int64_t n) {
  if (n < 1 || n > kMaxTensorParallel) {
    return InvalidArgument("tensor parallel size = {} must be in [1, {}]", n, kMaxTensorParallel);
  }
  if (c.num_heads <= 0 || c.num_kv_heads <= 0 || c.intermediate_size <= 0 || c.vocab_size <= 0) {
    return InvalidArgument(
        "tensor parallel: model config has num_attention_heads = {}, num_key_value_heads = {}, "
        "intermediate_size = {}, vocab_size = {}; all must be positive",
        c.num_heads, c.num_kv_heads, c.intermediate_size, c.vocab_size);
  }
  if (c.num_heads % n != 0) {
    return InvalidArgument(
        "tensor parallel size {} does not divide num_attention_heads = {} (each rank needs whole "
        "query heads)",
        n, c.num_heads);
  }
  if (c.num_kv_heads >= n && c.num_kv_heads % n != 0) {
    return InvalidArgument(
        "tensor parallel size {} does not divide num_key_value_heads = {} (each rank needs whole "
        "KV heads)",
        n, c.num_kv_heads);
  }
  if (c.num_kv_heads < n && n % c.num_kv_heads != 0) {
    return InvalidArgument(
        "tensor parallel size {} is not a multiple of num_key_value_heads = {} (with fewer KV "
        "heads than ranks, each KV head is replicated on an equal number of ranks)",
        n, c.num_kv_heads);
  }
  if (c.intermediate_size % n != 0) {
    return InvalidArgument(
        "tensor parallel size {} does not divide {} (each rank needs an equal "
        "share of the MLP)",
        n, IntermediateKey(c));
  }
  return Status::Ok();
}

Result<ShardPlan> MakeShardPlan(const ModelConfig& c, int64_t n, int64_t rank) {
  QILIN_RETURN_IF_ERROR(CheckShardable(c, n));
  if (rank < 0 || rank >= n) {
    return OutOfRange("tensor parallel rank {} is outside [0, {})", rank, n);
  }
  ShardPlan p;
  p.world_size = n;
  p.rank = rank;
  p.num_heads = c.num_heads / n;
  p.q_head_begin = rank * p.num_heads;
  if (c.num_kv_heads >= n) {
    p.num_kv_heads = c.num_kv_heads / n;
    p.kv_head_begin = rank * p.num_kv_heads;
  } else {
    // The KV head that this rank's query heads read: they lie in one group of
    // num_heads / num_kv_heads query heads, since num_heads / n divides that group size.
    p.kv_replicated = true;
    p.num_kv_heads = 1;
    p.kv_head_begin = p.q_head_begin / (c.num_heads / c.num_kv_heads);
  }
  p.intermediate_size = c.intermediate_size / n;
  p.inter_begin = rank * p.intermediate_size;
  const int64_t unit = n * kVocabPadMultiple;
  p.padded_vocab = (c.vocab_size + unit - 1) / unit * unit;
  p.vocab_per_rank = p.padded_vocab / n;
  p.vocab_begin = rank * p.vocab_per_rank;
  p.vocab_end = std::min(c.vocab_size, p.vocab_begin + p.vocab_per_rank);
  if (p.vocab_end < p.vocab_begin) p.vocab_end = p.vocab_begin;
  return p;
}

ModelConfig ShardedLayerConfig(const ModelConfig& c, const ShardPlan& p) {
  ModelConfig local = c;
  local.num_heads = p.num_heads;
  local.num_kv_heads = p.num_kv_heads;
  local.intermediate_size = p.intermediate_size;
  return local;
}

Result<ModelWeights> ShardWeights(const ModelWeights& full, const ModelConfig& c,
                                  const ShardPlan& p) {
  if (p.world_size < 1 || p.rank < 0 || p.rank >= p.world_size) {
    return InvalidArgument("sharding: plan has rank {} of world size {}", p.rank, p.world_size);
  }
  const int64_t H = c.hidden_size, V = c.vocab_size, I = c.intermediate_size, d = c.head_dim;
  const int64_t Q = c.q_size(), KV = c.kv_size();
  if (static_cast<int64_t>(full.layers.size()) != c.num_layers) {
    return InvalidArgument("sharding: weights have {} layers, num_hidden_layers = {}",
                           full.layers.size(), c.num_layers);
  }
  QILIN_RETURN_IF_ERROR(CheckShape(full.embed_tokens, "embed_tokens", -1, {V, H}));
  QILIN_RETURN_IF_ERROR(CheckShape(full.lm_head, "lm_head", -1, {V, H}));
  QILIN_RETURN_IF_ERROR(CheckShape(full.final_norm, "final_norm", -1, {H}));

  ModelWeights w;
  w.storage = full.storage;
  const int64_t r = p.rank;
  const int64_t q0 = p.q_head_begin * d, qn = p.num_heads * d;
  const int64_t k0 = p.kv_head_begin * d, kn = p.num_kv_heads * d;
  const int64_t i0 = p.inter_begin, in = p.intermediate_size;
  w.layers.resize(c.num_layers);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& f = full.layers[l];
    LayerWeights& s = w.layers[l];
    QILIN_RETURN_IF_ERROR(CheckShape(f.input_norm, "input_norm", l, {H}));
    QILIN_RETURN_IF_ERROR(CheckShape(f.q_proj, "q_proj", l, {Q, H}));
    QILIN_RETURN_IF_ERROR(CheckShape(f.k_proj, "k_proj", l, {KV, H}));
    QILIN_RETURN_IF_ERROR(CheckShape(f.v_proj, "v_proj", l, {KV, H}));
    QILIN_RETURN_IF_ERROR(CheckShape(f.o_proj, "o_proj", l, {H, Q}));
    QILIN_RETURN_IF_ERROR(CheckShape(f.post_attention_norm, "post_attention_norm", l, {H}));
    QILIN_RETURN_IF_ERROR(CheckShape(f.gate_proj, "gate_proj", l, {I, H}));
    QILIN_RETURN_IF_ERROR(CheckShape(f.up_proj, "up_proj", l, {I, H}));
    QILIN_RETURN_IF_ERROR(CheckShape(f.down_proj, "down_proj", l, {H, I}));
    s.input_norm = f.input_norm;
    s.post_attention_norm = f.post_attention_norm;
    s.q_proj = RowSlice(f.q_proj, q0, qn, r);
    s.k_proj = RowSlice(f.k_proj, k0, kn, r);
    s.v_proj = RowSlice(f.v_proj, k0, kn, r);
    if (c.attention_bias) {
      QILIN_RETURN_IF_ERROR(CheckShape(f.q_bias, "q_bias", l, {Q}));
      QILIN_RETURN_IF_ERROR(CheckShape(f.k_bias, "k_bias", l, {KV}));
      QILIN_RETURN_IF_ERROR(CheckShape(f.v_bias, "v_bias", l, {KV}));
      s.q_bias = RowSlice(f.q_bias, q0, qn, r);
      s.k_bias = RowSlice(f.k_bias, k0, kn, r);
      s.v_bias = RowSlice(f.v_bias, k0, kn, r);
    }
    if (c.qk_norm) {
      QILIN_RETURN_IF_ERROR(CheckShape(f.q_norm, "q_norm", l, {d}));
      QILIN_RETURN_IF_ERROR(CheckShape(f.k_norm, "k_norm", l, {d}));
      s.q_norm = f.q_norm;
      s.k_norm = f.k_norm;
    }
    QILIN_ASSIGN_OR_RETURN(s.o_proj, ColumnSlice(f.o_proj, q0, qn, r, &w));
    if (c.o_bias) {
      QILIN_RETURN_IF_ERROR(CheckShape(f.o_bias, "o_bias", l, {H}));
      s.o_bias = f.o_bias;
    }
    s.gate_proj = RowSlice(f.gate_proj, i0, in, r);
    s.up_proj = RowSlice(f.up_proj, i0, in, r);
    QILIN_ASSIGN_OR_RETURN(s.down_proj, ColumnSlice(f.down_proj, i0, in, r, &w));
  }
  w.final_norm = full.final_norm;
  w.embed_tokens = RowSlice(full.embed_tokens, p.vocab_begin, p.vocab_rows(), r);
  w.lm_head = full.lm_head.data == full.embed_tokens.data
                  ? w.embed_tokens
                  : RowSlice(full.lm_head, p.vocab_begin, p.vocab_rows(), r);
  return w;
}

Result<ModelWeights> LoadShardedWeights(const ModelConfig& config,
                                        const std::filesystem::path& model_dir,
                                        const ShardPlan& plan) {
  QILIN_ASSIGN_OR_RETURN(ModelWeights full, LoadModelWeights(config, model_dir));
  return ShardWeights(full, config, plan);
}

}  // namespace qilin
