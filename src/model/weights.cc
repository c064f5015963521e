// LoadModelWeights: maps each architecture's checkpoint names onto ModelWeights and checks every
// tensor's presence, dtype and shape against the config.
#include <cstdint>
#include <cstring>
#include <new>
#include <set>

#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include "model/safetensors.h"
#include "model/weights.h"

namespace qilin {
namespace {

bool IsFloat(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }

std::string ShapeString(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

class Loader {
 public:
  Loader(const SafetensorsCheckpoint& ckpt, const std::filesystem::path& dir, ModelWeights* out)
      : ckpt_(ckpt), dir_(dir.string()), out_(out) {}

  // The tensor `name`, which must be a float tensor of exactly `shape`.
  Result<TensorView> Get(const std::string& name, const std::vector<int64_t>& shape) {
    if (!ckpt_.contains(name)) {
      return NotFound("{}: checkpoint has no tensor '{}' (expected shape {})", dir_, name,
                      ShapeString(shape));
    }
    const std::string file = ckpt_.file_of(name)->path().string();
    QILIN_ASSIGN_OR_RETURN(TensorView v, ckpt_.Find(name));
    used_.insert(name);
    if (!IsFloat(v.dtype)) {
      return InvalidArgument("{}: tensor '{}' has dtype {}; weights must be F32, F16 or BF16", file,
                             name, DTypeName(v.dtype));
    }
    if (v.shape != shape) {
      return InvalidArgument("{}: tensor '{}' has shape {}, expected {} from config.json", file,
                             name, ShapeString(v.shape), ShapeString(shape));
    }
    return Aligned(std::move(v));
  }

  // Marks a tensor as deliberately unused (e.g. lm_head of a tied checkpoint).
  void Skip(const std::string& name) { used_.insert(name); }

  void LogUnused() const {
    size_t unused = 0;
    for (const std::string& name : ckpt_.names()) {
      if (used_.count(name) == 0) {
        spdlog::debug("{}: ignoring unused tensor '{}'", dir_, name);
        ++unused;
      }
    }
    if (unused > 0) spdlog::debug("{}: {} unused tensors ignored", dir_, unused);
  }

 private:
  // Safetensors only promises alignment where the writer padded the header; a misaligned
  // tensor is copied into an owned buffer so that backends may read it as its element type.
  TensorView Aligned(TensorView v) {
    const size_t align = DTypeSize(v.dtype);
    if (reinterpret_cast<uintptr_t>(v.data) % align == 0) return v;
    if (!warned_) {
      spdlog::warn("{}: tensor data is not {}-byte aligned; copying misaligned tensors", dir_,
                   align);
      warned_ = true;
    }
    const size_t n = v.nbytes();
    std::shared_ptr<void> buf(::operator new(n == 0 ? 1 : n),
                              [](void* p) { ::operator delete(p); });
    std::memcpy(buf.get(), v.data, n);
    v.data = buf.get();
    out_->storage.push_back(std::move(buf));
    return v;
  }

  const SafetensorsCheckpoint& ckpt_;
  std::string dir_;
  ModelWeights* out_;
  std::set<std::string> used_;
  bool warned_ = false;
};

// Rows [row0, row0 + rows) of a row-major tensor (matrix or vector), without a copy.
TensorView Rows(const TensorView& t, int64_t row0, int64_t rows, const char* part) {
  TensorView v = t;
  int64_t row_elems = 1;
  for (size_t i = 1; i < t.shape.size(); ++i) row_elems *= t.shape[i];
  v.shape[0] = rows;
  v.data = static_cast<const uint8_t*>(t.data) + row0 * row_elems * DTypeSize(t.dtype);
  v.name = fmt::format("{} ({} rows)", t.name, part);
  return v;
}

// Llama, Qwen2, Qwen3: transformers' names.
Status LoadHf(const ModelConfig& c, Loader& l, ModelWeights* w) {
  const int64_t H = c.hidden_size, V = c.vocab_size, I = c.intermediate_size;
  const int64_t Q = c.q_size(), KV = c.kv_size();
  QILIN_ASSIGN_OR_RETURN(w->embed_tokens, l.Get("model.embed_tokens.weight", {V, H}));
  w->layers.resize(c.num_layers);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    LayerWeights& L = w->layers[i];
    const std::string p = fmt::format("model.layers.{}.", i);
    QILIN_ASSIGN_OR_RETURN(L.input_norm, l.Get(p + "input_layernorm.weight", {H}));
    QILIN_ASSIGN_OR_RETURN(L.q_proj, l.Get(p + "self_attn.q_proj.weight", {Q, H}));
    QILIN_ASSIGN_OR_RETURN(L.k_proj, l.Get(p + "self_attn.k_proj.weight", {KV, H}));
    QILIN_ASSIGN_OR_RETURN(L.v_proj, l.Get(p + "self_attn.v_proj.weight", {KV, H}));
    if (c.attention_bias) {
      QILIN_ASSIGN_OR_RETURN(L.q_bias, l.Get(p + "self_attn.q_proj.bias", {Q}));
      QILIN_ASSIGN_OR_RETURN(L.k_bias, l.Get(p + "self_attn.k_proj.bias", {KV}));
      QILIN_ASSIGN_OR_RETURN(L.v_bias, l.Get(p + "self_attn.v_proj.bias", {KV}));
    }
    if (c.qk_norm) {
      QILIN_ASSIGN_OR_RETURN(L.q_norm, l.Get(p + "self_attn.q_norm.weight", {c.head_dim}));
      QILIN_ASSIGN_OR_RETURN(L.k_norm, l.Get(p + "self_attn.k_norm.weight", {c.head_dim}));
    }
    QILIN_ASSIGN_OR_RETURN(L.o_proj, l.Get(p + "self_attn.o_proj.weight", {H, Q}));
    if (c.o_bias) {
      QILIN_ASSIGN_OR_RETURN(L.o_bias, l.Get(p + "self_attn.o_proj.bias", {H}));
    }
    QILIN_ASSIGN_OR_RETURN(L.post_attention_norm,
                           l.Get(p + "post_attention_layernorm.weight", {H}));
    QILIN_ASSIGN_OR_RETURN(L.gate_proj, l.Get(p + "mlp.gate_proj.weight", {I, H}));
    QILIN_ASSIGN_OR_RETURN(L.up_proj, l.Get(p + "mlp.up_proj.weight", {I, H}));
    QILIN_ASSIGN_OR_RETURN(L.down_proj, l.Get(p + "mlp.down_proj.weight", {H, I}));
  }
  QILIN_ASSIGN_OR_RETURN(w->final_norm, l.Get("model.norm.weight", {H}));
  return Status::Ok();
}

// Qwen v1 (modeling_qwen.py): fused c_attn split into q/k/v row views; w1 is up, w2 is gate
// (QWenMLP computes w1(x) * silu(w2(x))).
Status LoadQwenV1(const ModelConfig& c, Loader& l, ModelWeights* w) {
  const int64_t H = c.hidden_size, V = c.vocab_size, I = c.intermediate_size, Q = c.q_size();
  QILIN_ASSIGN_OR_RETURN(w->embed_tokens, l.Get("transformer.wte.weight", {V, H}));
  w->layers.resize(c.num_layers);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    LayerWeights& L = w->layers[i];
    const std::string p = fmt::format("transformer.h.{}.", i);
    QILIN_ASSIGN_OR_RETURN(L.input_norm, l.Get(p + "ln_1.weight", {H}));
    QILIN_ASSIGN_OR_RETURN(TensorView qkv, l.Get(p + "attn.c_attn.weight", {3 * Q, H}));
    L.q_proj = Rows(qkv, 0, Q, "q");
    L.k_proj = Rows(qkv, Q, Q, "k");
    L.v_proj = Rows(qkv, 2 * Q, Q, "v");
    QILIN_ASSIGN_OR_RETURN(TensorView qkv_bias, l.Get(p + "attn.c_attn.bias", {3 * Q}));
    L.q_bias = Rows(qkv_bias, 0, Q, "q");
    L.k_bias = Rows(qkv_bias, Q, Q, "k");
    L.v_bias = Rows(qkv_bias, 2 * Q, Q, "v");
    QILIN_ASSIGN_OR_RETURN(L.o_proj, l.Get(p + "attn.c_proj.weight", {H, Q}));
    QILIN_ASSIGN_OR_RETURN(L.post_attention_norm, l.Get(p + "ln_2.weight", {H}));
    QILIN_ASSIGN_OR_RETURN(L.up_proj, l.Get(p + "mlp.w1.weight", {I, H}));
    QILIN_ASSIGN_OR_RETURN(L.gate_proj, l.Get(p + "mlp.w2.weight", {I, H}));
    QILIN_ASSIGN_OR_RETURN(L.down_proj, l.Get(p + "mlp.c_proj.weight", {H, I}));
  }
  QILIN_ASSIGN_OR_RETURN(w->final_norm, l.Get("transformer.ln_f.weight", {H}));
  return Status::Ok();
}

}  // namespace

Result<ModelWeights> LoadModelWeights(const ModelConfig& config,
                                      const std::filesystem::path& model_dir) {
  QILIN_ASSIGN_OR_RETURN(SafetensorsCheckpoint ckpt, SafetensorsCheckpoint::Open(model_dir));
  ModelWeights w;
  for (const auto& f : ckpt.files()) w.storage.push_back(f);
  Loader loader(ckpt, model_dir, &w);
  if (config.arch == ModelArch::kQwenV1) {
    QILIN_RETURN_IF_ERROR(LoadQwenV1(config, loader, &w));
  } else {
    QILIN_RETURN_IF_ERROR(LoadHf(config, loader, &w));
  }
  if (config.tie_word_embeddings) {
    // transformers ties lm_head to the embedding and ignores a stored copy.
    loader.Skip("lm_head.weight");
    w.lm_head = w.embed_tokens;
  } else {
    auto lm_head = loader.Get("lm_head.weight", {config.vocab_size, config.hidden_size});
    if (!lm_head.ok() && lm_head.status().code() == StatusCode::kNotFound) {
      return NotFound("{} (config.json has tie_word_embeddings = false)",
                      lm_head.status().message());
    }
    if (!lm_head.ok()) return lm_head.status();
    w.lm_head = *lm_head;
  }
  loader.LogUnused();
  spdlog::debug("{}: loaded {} ({} layers) from {} file(s)", model_dir.string(),
                ModelArchName(config.arch), config.num_layers, ckpt.files().size());
  return w;
}

}  // namespace qilin
