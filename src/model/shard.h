// Tensor-parallel sharding (Megatron-style) of one model over `world_size` ranks:
//   attention  q/k/v column-parallel by heads (q/k/v bias sliced with their rows), o_proj
//              row-parallel (its input columns split; the partial outputs are all-reduced);
//              KV heads split as the query heads, or, when num_key_value_heads < world_size,
//              replicated: each rank keeps the one KV head its query heads read;
//   MLP        gate/up column-parallel, down_proj row-parallel (all-reduced);
//   vocab      embedding and lm_head vocab-parallel over a padded vocabulary (each rank a
//              contiguous range of rows; the embedding is all-reduced, the logits gathered);
//   norms, q_norm/k_norm and o_proj's bias are replicated (the bias is added once, after the
//   reduction).
// A rank's weights are views into the full checkpoint where its slice is contiguous rows (no
// copy, no read until used) and owned copies of just its columns otherwise (o_proj, down_proj),
// so a rank touches only its own bytes of the mmapped safetensors.
#pragma once

#include <cstdint>
#include <filesystem>

#include "common/status.h"
#include "model/config.h"
#include "model/weights.h"

namespace qilin {

// Ranks a plan accepts (ranks in one process are threads; across GPUs, one per GPU).
inline constexpr int64_t kMaxTensorParallel = 256;
// Each rank's vocabulary rows are a multiple of this (the padded vocabulary is a multiple of
// world_size times it), as vLLM pads to 64: aligned row blocks for the lm_head kernels.
inline constexpr int64_t kVocabPadMultiple = 16;

// What rank `rank` of `world_size` holds. Ranges are [begin, begin + count) in the model's
// numbering.
struct ShardPlan {
  int64_t world_size = 1;
  int64_t rank = 0;
  // Query heads of this rank: num_attention_heads / world_size.
  int64_t num_heads = 0;
  int64_t q_head_begin = 0;
  // KV heads of this rank: num_key_value_heads / world_size, or 1 when replicated.
  int64_t num_kv_heads = 0;
  int64_t kv_head_begin = 0;
  bool kv_replicated = false;  // num_key_value_heads < world_size
  // MLP rows of gate/up and columns of down_proj: intermediate_size / world_size.
  int64_t intermediate_size = 0;
  int64_t inter_begin = 0;
  // Vocabulary: rows [vocab_begin, vocab_begin + vocab_per_rank) of the padded vocabulary, of
  // which [vocab_begin, vocab_end) are real (vocab_end <= vocab_size; may be empty).
  int64_t padded_vocab = 0;
  int64_t vocab_per_rank = 0;
  int64_t vocab_begin = 0;
  int64_t vocab_end = 0;

  int64_t vocab_rows() const { return vocab_end > vocab_begin ? vocab_end - vocab_begin : 0; }
};

// InvalidArgument naming the config key, its value and world_size when a dimension does not
// divide: num_attention_heads % world_size, num_key_value_heads % world_size (or world_size %
// num_key_value_heads when replicating), intermediate_size % world_size. world_size must be in
// [1, kMaxTensorParallel].
Status CheckShardable(const ModelConfig& config, int64_t world_size);

// The plan of one rank (CheckShardable's errors; OutOfRange for a rank outside [0, world_size)).
Result<ShardPlan> MakeShardPlan(const ModelConfig& config, int64_t world_size, int64_t rank);

// The config a rank's layers compute with: num_heads, num_kv_heads and intermediate_size of the
// plan; everything else (hidden size, head_dim, rope, vocab_size) as the model's.
ModelConfig ShardedLayerConfig(const ModelConfig& config, const ShardPlan& plan);

// One rank's weights from the full ones (typically LoadModelWeights' mmapped views). Shapes are
// the rank's: q_proj [num_heads * head_dim, hidden], k/v_proj [num_kv_heads * head_dim, hidden],
// o_proj [hidden, num_heads * head_dim], gate/up [intermediate_size, hidden], down_proj
// [hidden, intermediate_size], embed_tokens and lm_head [vocab_rows(), hidden] (empty when the
// rank has no real rows). Shares the full weights' storage. InvalidArgument when a tensor's
// shape does not match `config`.
Result<ModelWeights> ShardWeights(const ModelWeights& full, const ModelConfig& config,
                                  const ShardPlan& plan);

// LoadModelWeights (which only maps the files and checks the headers) and ShardWeights: the rank
// reads only its slices.
Result<ModelWeights> LoadShardedWeights(const ModelConfig& config,
                                        const std::filesystem::path& model_dir,
                                        const ShardPlan& plan);

}  // namespace qilin
