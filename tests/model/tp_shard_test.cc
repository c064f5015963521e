// Sharding plans and sharded weights: every rank's slices, put back together by the textbook
// layout (column-parallel rows concatenated, row-parallel columns side by side, vocab rows
// concatenated), equal the unsharded checkpoint tensors byte for byte; shapes that do not divide
// are refused naming the key, its value and the tensor parallel size.
#include <cstring>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "model/config.h"
#include "model/shard.h"
#include "model/weights.h"

namespace qilin {
namespace {

namespace fs = std::filesystem;

const fs::path kGoldenDir = fs::path(QILIN_SOURCE_DIR) / "tests/fixtures/golden";

const uint8_t* Bytes(const TensorView& t) { return static_cast<const uint8_t*>(t.data); }

// Rows [r0, r0 + n) of a 1-D or 2-D tensor as bytes.
std::vector<uint8_t> RowBytes(const TensorView& t, int64_t r0, int64_t n) {
  const int64_t row = (t.shape.size() > 1 ? t.shape[1] : 1) * DTypeSize(t.dtype);
  return std::vector<uint8_t>(Bytes(t) + r0 * row, Bytes(t) + (r0 + n) * row);
}

std::vector<uint8_t> AllBytes(const TensorView& t) {
  return std::vector<uint8_t>(Bytes(t), Bytes(t) + t.nbytes());
}

// Column-parallel: the ranks' rows concatenated in rank order.
std::vector<uint8_t> ConcatRows(const std::vector<ModelWeights>& shards,
                                const TensorView& (*get)(const ModelWeights&)) {
  std::vector<uint8_t> out;
  for (const auto& s : shards) {
    const TensorView& t = get(s);
    if (t.empty()) continue;
    auto b = AllBytes(t);
    out.insert(out.end(), b.begin(), b.end());
  }
  return out;
}

// Row-parallel: row i of the full matrix is the ranks' row i side by side.
std::vector<uint8_t> ConcatColumns(const std::vector<const TensorView*>& parts) {
  std::vector<uint8_t> out;
  const int64_t rows = parts[0]->shape[0];
  for (int64_t i = 0; i < rows; ++i) {
    for (const TensorView* t : parts) {
      const int64_t row = t->shape[1] * DTypeSize(t->dtype);
      out.insert(out.end(), Bytes(*t) + i * row, Bytes(*t) + (i + 1) * row);
    }
  }
  return out;
}

struct Loaded {
  ModelConfig config;
  ModelWeights full;
};

Loaded LoadGolden(const std::string& name) {
  Loaded l;
  auto c = LoadModelConfig(kGoldenDir / name);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  l.config = *c;
  auto w = LoadModelWeights(l.config, kGoldenDir / name);
  EXPECT_TRUE(w.ok()) << w.status().ToString();
  l.full = std::move(*w);
  return l;
}

struct Case {
  std::string fixture;
  int tp;
};

class ShardRecombineTest : public ::testing::TestWithParam<Case> {};

TEST_P(ShardRecombineTest, ShardsRecombinedEqualTheFullWeights) {
  const auto [name, tp] = GetParam();
  Loaded L = LoadGolden(name);
  const ModelConfig& c = L.config;
  ASSERT_TRUE(CheckShardable(c, tp).ok()) << CheckShardable(c, tp).ToString();
  std::vector<ShardPlan> plans;
  std::vector<ModelWeights> shards;
  for (int r = 0; r < tp; ++r) {
    auto p = MakeShardPlan(c, tp, r);
    ASSERT_TRUE(p.ok()) << p.status().ToString();
    plans.push_back(*p);
    auto s = LoadShardedWeights(c, kGoldenDir / name, *p);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    shards.push_back(std::move(*s));
  }
  const int64_t d = c.head_dim, H = c.hidden_size;
  const int64_t group = c.num_heads / c.num_kv_heads;  // query heads per KV head
  for (int64_t l = 0; l < c.num_layers; ++l) {
    SCOPED_TRACE(name + " tp " + std::to_string(tp) + " layer " + std::to_string(l));
    const LayerWeights& F = L.full.layers[l];
    auto layer = [&](int r) -> const LayerWeights& { return shards[r].layers[l]; };
    // q_proj and q_bias: column-parallel.
    std::vector<uint8_t> q, qb, gate, up;
    for (int r = 0; r < tp; ++r) {
      EXPECT_EQ(layer(r).q_proj.shape, (std::vector<int64_t>{c.q_size() / tp, H}));
      auto b = AllBytes(layer(r).q_proj);
      q.insert(q.end(), b.begin(), b.end());
      if (c.attention_bias) {
        b = AllBytes(layer(r).q_bias);
        qb.insert(qb.end(), b.begin(), b.end());
      }
      b = AllBytes(layer(r).gate_proj);
      gate.insert(gate.end(), b.begin(), b.end());
      b = AllBytes(layer(r).up_proj);
      up.insert(up.end(), b.begin(), b.end());
    }
    EXPECT_EQ(q, AllBytes(F.q_proj));
    if (c.attention_bias) {
      EXPECT_EQ(qb, AllBytes(F.q_bias));
    }
    EXPECT_EQ(gate, AllBytes(F.gate_proj));
    EXPECT_EQ(up, AllBytes(F.up_proj));
    // k/v (and their bias): each rank holds the KV heads its query heads read; every KV head is
    // held by some rank.
    std::set<int64_t> covered;
    for (int r = 0; r < tp; ++r) {
      const int64_t nkv = layer(r).k_proj.shape[0] / d;
      const int64_t first_q = r * c.num_heads / tp, last_q = (r + 1) * c.num_heads / tp - 1;
      const int64_t kv0 = first_q / group;
      EXPECT_EQ(kv0 + nkv - 1, last_q / group) << "rank " << r;
      for (int64_t j = 0; j < nkv; ++j) {
        covered.insert(kv0 + j);
        EXPECT_EQ(RowBytes(layer(r).k_proj, j * d, d), RowBytes(F.k_proj, (kv0 + j) * d, d));
        EXPECT_EQ(RowBytes(layer(r).v_proj, j * d, d), RowBytes(F.v_proj, (kv0 + j) * d, d));
        if (c.attention_bias) {
          EXPECT_EQ(RowBytes(layer(r).k_bias, j * d, d), RowBytes(F.k_bias, (kv0 + j) * d, d));
          EXPECT_EQ(RowBytes(layer(r).v_bias, j * d, d), RowBytes(F.v_bias, (kv0 + j) * d, d));
        }
      }
    }
    EXPECT_EQ(static_cast<int64_t>(covered.size()), c.num_kv_heads);
    // o_proj and down_proj: row-parallel (input columns split).
    std::vector<const TensorView*> o, down;
    for (int r = 0; r < tp; ++r) {
      o.push_back(&layer(r).o_proj);
      down.push_back(&layer(r).down_proj);
      EXPECT_EQ(layer(r).o_proj.shape, (std::vector<int64_t>{H, c.q_size() / tp}));
      EXPECT_EQ(layer(r).down_proj.shape, (std::vector<int64_t>{H, c.intermediate_size / tp}));
    }
    EXPECT_EQ(ConcatColumns(o), AllBytes(F.o_proj));
    EXPECT_EQ(ConcatColumns(down), AllBytes(F.down_proj));
    // Replicated: norms (and Qwen3's q/k norms) are the same tensors.
    for (int r = 0; r < tp; ++r) {
      EXPECT_EQ(AllBytes(layer(r).input_norm), AllBytes(F.input_norm));
      EXPECT_EQ(AllBytes(layer(r).post_attention_norm), AllBytes(F.post_attention_norm));
      if (c.qk_norm) {
        EXPECT_EQ(AllBytes(layer(r).q_norm), AllBytes(F.q_norm));
        EXPECT_EQ(AllBytes(layer(r).k_norm), AllBytes(F.k_norm));
      }
    }
  }
  // Vocab-parallel embedding and lm_head: rows concatenated, padding left out.
  EXPECT_EQ(
      ConcatRows(shards, [](const ModelWeights& w) -> const TensorView& { return w.embed_tokens; }),
      AllBytes(L.full.embed_tokens));
  EXPECT_EQ(
      ConcatRows(shards, [](const ModelWeights& w) -> const TensorView& { return w.lm_head; }),
      AllBytes(L.full.lm_head));
  for (int r = 0; r < tp; ++r) {
    EXPECT_EQ(plans[r].padded_vocab % (tp * kVocabPadMultiple), 0);
    EXPECT_GE(plans[r].padded_vocab, c.vocab_size);
    EXPECT_LT(plans[r].padded_vocab - c.vocab_size, tp * kVocabPadMultiple);
    if (c.tie_word_embeddings) {
      EXPECT_EQ(shards[r].lm_head.data, shards[r].embed_tokens.data);
    }
  }
}

TEST_P(ShardRecombineTest, ColumnParallelSlicesAreViewsIntoTheMapping) {
  // A rank reads only its slices: its row slices point into the full (mmapped) tensors.
  const auto [name, tp] = GetParam();
  Loaded L = LoadGolden(name);
  const ModelConfig& c = L.config;
  for (int r = 0; r < tp; ++r) {
    auto p = MakeShardPlan(L.config, tp, r);
    ASSERT_TRUE(p.ok());
    auto s = ShardWeights(L.full, L.config, *p);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    const size_t es = DTypeSize(L.full.layers[0].q_proj.dtype);
    EXPECT_EQ(Bytes(s->layers[0].q_proj),
              Bytes(L.full.layers[0].q_proj) + r * (c.q_size() / tp) * c.hidden_size * es);
    EXPECT_EQ(
        Bytes(s->layers[0].gate_proj),
        Bytes(L.full.layers[0].gate_proj) + r * (c.intermediate_size / tp) * c.hidden_size * es);
  }
}

std::vector<Case> Cases() {
  // Every fixture at every size its shapes allow (qwen2-yarn-tied's 5 heads allow none).
  std::vector<Case> out;
  for (const char* f : {"qwen2", "qwen3", "llama-linear", "llama-dynamic", "qwen-v1"}) {
    out.push_back({f, 2});
  }
  for (const char* f : {"llama-linear", "llama-dynamic", "qwen-v1"}) out.push_back({f, 4});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Golden, ShardRecombineTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) {
                           std::string n =
                               info.param.fixture + "_tp" + std::to_string(info.param.tp);
                           for (char& ch : n)
                             if (ch == '-') ch = '_';
                           return n;
                         });

ModelConfig Shape(int64_t heads, int64_t kv_heads, int64_t inter, int64_t vocab) {
  ModelConfig c;
  c.arch = ModelArch::kQwen2;
  c.vocab_size = vocab;
  c.hidden_size = 64;
  c.intermediate_size = inter;
  c.num_layers = 1;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = 8;
  return c;
}

void ExpectRefused(const ModelConfig& c, int tp, const std::vector<std::string>& parts) {
  Status st = CheckShardable(c, tp);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  for (const std::string& p : parts) {
    EXPECT_NE(st.message().find(p), std::string::npos) << st.message() << " lacks " << p;
  }
  auto plan = MakeShardPlan(c, tp, 0);
  EXPECT_FALSE(plan.ok());
}

TEST(ShardPlanTest, NonDividingShapesNameTheKeyValueAndSize) {
  ExpectRefused(Shape(6, 2, 64, 100), 4, {"num_attention_heads = 6", "size 4"});
  ExpectRefused(Shape(6, 3, 64, 100), 2, {"num_key_value_heads = 3", "size 2"});
  ExpectRefused(Shape(12, 3, 64, 100), 4, {"num_key_value_heads = 3", "size 4", "multiple"});
  ExpectRefused(Shape(4, 4, 44, 100), 8, {"num_attention_heads = 4", "size 8"});
  ExpectRefused(Shape(8, 8, 44, 100), 8, {"intermediate_size = 44", "size 8"});
  ExpectRefused(Shape(4, 2, 64, 100), 0, {"tensor parallel size = 0"});
  ExpectRefused(Shape(4, 2, 64, 100), -3, {"tensor parallel size = -3"});
  ExpectRefused(Shape(512, 512, 512, 100), 512, {"tensor parallel size = 512", "256"});
  ModelConfig v1 = Shape(4, 4, 66, 100);
  v1.arch = ModelArch::kQwenV1;
  ExpectRefused(v1, 4, {"intermediate_size = 132", "66 each", "size 4"});
  // The golden fixture with 5 heads.
  Loaded L = LoadGolden("qwen2-yarn-tied");
  ExpectRefused(L.config, 2, {"num_attention_heads = 5", "size 2"});
  auto rank = MakeShardPlan(Shape(4, 2, 64, 100), 2, 2);
  ASSERT_FALSE(rank.ok());
  EXPECT_NE(rank.status().message().find("rank 2"), std::string::npos);
}

TEST(ShardPlanTest, ReplicatedKvHeadsFollowTheQueryHeads) {
  // 8 query heads in 2 groups of 4 over 8 ranks: ranks 0-3 read KV head 0, ranks 4-7 head 1.
  const ModelConfig c = Shape(8, 2, 64, 1000);
  for (int r = 0; r < 8; ++r) {
    auto p = MakeShardPlan(c, 8, r);
    ASSERT_TRUE(p.ok()) << p.status().ToString();
    EXPECT_TRUE(p->kv_replicated);
    EXPECT_EQ(p->num_heads, 1);
    EXPECT_EQ(p->q_head_begin, r);
    EXPECT_EQ(p->num_kv_heads, 1);
    EXPECT_EQ(p->kv_head_begin, r / 4);
    EXPECT_EQ(p->intermediate_size, 8);
    EXPECT_EQ(p->inter_begin, 8 * r);
  }
  auto p = MakeShardPlan(c, 2, 1);
  ASSERT_TRUE(p.ok());
  EXPECT_FALSE(p->kv_replicated);
  EXPECT_EQ(p->num_kv_heads, 1);
  EXPECT_EQ(p->kv_head_begin, 1);
}

TEST(ShardPlanTest, VocabIsPaddedAndSplitIntoContiguousRanges) {
  // 1000 over 3 ranks: padded to 1008 (a multiple of 3 x 16), 336 each; the last has 328 real.
  const ModelConfig c = Shape(6, 6, 60, 1000);
  int64_t real = 0;
  for (int r = 0; r < 3; ++r) {
    auto p = MakeShardPlan(c, 3, r);
    ASSERT_TRUE(p.ok());
    EXPECT_EQ(p->padded_vocab, 1008);
    EXPECT_EQ(p->vocab_per_rank, 336);
    EXPECT_EQ(p->vocab_begin, 336 * r);
    real += p->vocab_rows();
  }
  EXPECT_EQ(real, 1000);
  // A vocabulary smaller than the ranks' padding: the last ranks hold only padding.
  const ModelConfig tiny = Shape(4, 4, 64, 20);
  auto last = MakeShardPlan(tiny, 4, 3);
  ASSERT_TRUE(last.ok());
  EXPECT_EQ(last->padded_vocab, 64);
  EXPECT_EQ(last->vocab_rows(), 0);
  auto first = MakeShardPlan(tiny, 4, 1);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first->vocab_rows(), 4);  // rows 16..19
}

TEST(ShardPlanTest, WeightsOfTheWrongShapeAreRefused) {
  Loaded L = LoadGolden("qwen2");
  auto p = MakeShardPlan(L.config, 2, 0);
  ASSERT_TRUE(p.ok());
  ModelWeights bad = L.full;
  bad.layers[1].o_proj.shape = {L.config.hidden_size, L.config.q_size() - 1};
  auto s = ShardWeights(bad, L.config, *p);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("o_proj"), std::string::npos) << s.status().message();
  bad = L.full;
  bad.layers[0].k_bias = TensorView{};
  s = ShardWeights(bad, L.config, *p);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("layers.0.k_bias"), std::string::npos)
      << s.status().message();
}

}  // namespace
}  // namespace qilin
