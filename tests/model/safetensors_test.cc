#include "model/safetensors.h"

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace qilin {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           fmt::format("qilin_st_{}_{}", ::getpid(),
                       ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A file made by hand from the format description: 8-byte little-endian length, the header
  // text as given (no padding), then `data`.
  fs::path WriteRaw(const std::string& name, const std::string& header, const std::string& data,
                    uint64_t header_len_override = UINT64_MAX) {
    uint64_t n = header_len_override == UINT64_MAX ? header.size() : header_len_override;
    std::string bytes(8, '\0');
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((n >> (8 * i)) & 0xff);
    bytes += header;
    bytes += data;
    fs::path p = dir_ / name;
    std::ofstream(p, std::ios::binary).write(bytes.data(), bytes.size());
    return p;
  }

  // Opens `p` and expects `code` with the file name and every part in the message.
  void ExpectOpenError(const fs::path& p, StatusCode code, std::vector<std::string> parts) {
    auto r = SafetensorsFile::Open(p);
    ASSERT_FALSE(r.ok()) << p;
    EXPECT_EQ(r.status().code(), code) << r.status().ToString();
    EXPECT_THAT(r.status().message(), HasSubstr(p.string()));
    for (const std::string& s : parts) EXPECT_THAT(r.status().message(), HasSubstr(s));
  }

  fs::path dir_;
};

std::vector<uint8_t> RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

TEST_F(SafetensorsTest, RoundTrip) {
  auto a = RandomBytes(2 * 3 * 4, 1), b = RandomBytes(4 * 2, 2), c = RandomBytes(2 * 2, 3);
  std::vector<SafetensorsTensor> ts = {
      {"layer.b", DType::kBF16, {4}, b.data(), b.size()},
      {"layer.a", DType::kF32, {2, 3}, a.data(), a.size()},
      {"empty", DType::kI8, {0, 5}, nullptr, 0},
      {"scalar.half", DType::kF16, {1, 1, 2}, c.data(), c.size()},
  };
  fs::path p = dir_ / "m.safetensors";
  ASSERT_TRUE(WriteSafetensors(p, ts, {{"format", "pt"}}).ok());
  auto r = SafetensorsFile::Open(p);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const SafetensorsFile& f = **r;
  EXPECT_THAT(f.names(), ElementsAre("empty", "layer.a", "layer.b", "scalar.half"));
  EXPECT_EQ(f.metadata().at("format"), "pt");
  for (const auto& t : ts) {
    auto v = f.Find(t.name);
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    EXPECT_EQ(v->dtype, t.dtype);
    EXPECT_EQ(v->shape, t.shape);
    EXPECT_EQ(v->name, t.name);
    ASSERT_EQ(v->nbytes(), t.nbytes);
    if (t.nbytes > 0) {
      EXPECT_EQ(std::memcmp(v->data, t.data, t.nbytes), 0) << t.name;
      EXPECT_EQ(reinterpret_cast<uintptr_t>(v->data) % DTypeSize(t.dtype), 0u) << t.name;
    }
  }
  auto missing = f.Find("nope");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("'nope'"));
  EXPECT_THAT(missing.status().message(), HasSubstr(p.string()));
}

// A file assembled byte by byte from the format description (unpadded header, tensors in
// reverse order of offsets, zero-sized tensor), independent of our writer.
TEST_F(SafetensorsTest, ReadsAHandMadeFile) {
  float x[2] = {1.5f, -2.0f};
  uint16_t y[3] = {0x3f80, 0x4000, 0xc040};  // bf16 1, 2, -3
  std::string data(reinterpret_cast<const char*>(y), 6);
  data.append(reinterpret_cast<const char*>(x), 8);
  auto p = WriteRaw("hand.safetensors",
                    R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[6,14]},)"
                    R"("y":{"dtype":"BF16","shape":[3,1],"data_offsets":[0,6]},)"
                    R"("z":{"dtype":"I64","shape":[0],"data_offsets":[6,6]}})",
                    data);
  auto r = SafetensorsFile::Open(p);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  auto vx = (*r)->Find("x");
  ASSERT_TRUE(vx.ok());
  float got[2];
  std::memcpy(got, vx->data, 8);
  EXPECT_EQ(got[0], 1.5f);
  EXPECT_EQ(got[1], -2.0f);
  auto vy = (*r)->Find("y");
  ASSERT_TRUE(vy.ok());
  EXPECT_THAT(vy->shape, ElementsAre(3, 1));
  uint16_t gy[3];
  std::memcpy(gy, vy->data, 6);
  EXPECT_EQ(Bf16ToF32(gy[2]), -3.0f);
  EXPECT_TRUE((*r)->contains("z"));
  EXPECT_TRUE((*r)->metadata().empty());
}

TEST_F(SafetensorsTest, MissingFile) {
  ExpectOpenError(dir_ / "absent.safetensors", StatusCode::kNotFound, {"no such file"});
  ExpectOpenError(dir_, StatusCode::kInvalidArgument, {"not a regular file"});
}

TEST_F(SafetensorsTest, TruncatedFile) {
  fs::path p = dir_ / "short.safetensors";
  std::ofstream(p, std::ios::binary) << "abc";
  ExpectOpenError(p, StatusCode::kDataLoss, {"3 bytes"});
  std::ofstream(p, std::ios::binary | std::ios::trunc);  // empty
  ExpectOpenError(p, StatusCode::kDataLoss, {"0 bytes"});

  // A valid file cut inside its data: the header promises more bytes than are there.
  auto a = RandomBytes(64, 4);
  fs::path full = dir_ / "full.safetensors";
  ASSERT_TRUE(WriteSafetensors(full, {{"t", DType::kF32, {16}, a.data(), a.size()}}).ok());
  fs::resize_file(full, fs::file_size(full) - 1);
  ExpectOpenError(full, StatusCode::kDataLoss, {"'t'", "data_offsets"});
}

TEST_F(SafetensorsTest, HeaderLengthLargerThanFile) {
  auto p = WriteRaw("len.safetensors", "{}", "", /*header_len_override=*/1000);
  ExpectOpenError(p, StatusCode::kDataLoss, {"header length 1000", "truncated"});
  p = WriteRaw("huge.safetensors", "{}", "", /*header_len_override=*/uint64_t{1} << 62);
  ExpectOpenError(p, StatusCode::kDataLoss, {"over the limit 100000000"});
}

TEST_F(SafetensorsTest, HeaderNotJson) {
  auto p = WriteRaw("nojson.safetensors", "{\"a\": nope}", "");
  ExpectOpenError(p, StatusCode::kDataLoss, {"invalid JSON", "byte offset"});
}

TEST_F(SafetensorsTest, HeaderNotObject) {
  auto p = WriteRaw("arr.safetensors", "[1, 2, 3]", "");
  ExpectOpenError(p, StatusCode::kDataLoss, {"expected an object", "array"});
  p = WriteRaw("entry.safetensors", R"({"w": [1]})", "");
  ExpectOpenError(p, StatusCode::kDataLoss, {"'w'", "expected an object"});
  p = WriteRaw("deep.safetensors", R"({"w": {"shape": [[1]]}})", "");
  ExpectOpenError(p, StatusCode::kDataLoss, {"nested"});
}

TEST_F(SafetensorsTest, DataOffsetsOutOfRange) {
  auto p = WriteRaw("off.safetensors", R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
                    std::string(12, 'x'));
  ExpectOpenError(p, StatusCode::kDataLoss, {"'w'", "data_offsets [0, 16]", "12-byte"});
  p = WriteRaw("rev.safetensors", R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})",
               std::string(12, 'x'));
  ExpectOpenError(p, StatusCode::kDataLoss, {"'w'", "data_offsets"});
  p = WriteRaw("neg.safetensors", R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})",
               std::string(12, 'x'));
  ExpectOpenError(p, StatusCode::kDataLoss, {"'w'", "data_offsets"});
  p = WriteRaw("form.safetensors", R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}})",
               std::string(4, 'x'));
  ExpectOpenError(p, StatusCode::kDataLoss, {"'w'", "[begin, end]"});
  p = WriteRaw("huge.safetensors",
               R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551615]}})",
               std::string(4, 'x'));
  ExpectOpenError(p, StatusCode::kDataLoss, {"'w'", "data_offsets"});
}

TEST_F(SafetensorsTest, SizeNotShapeTimesDtype) {
  auto p =
      WriteRaw("size.safetensors", R"({"w":{"dtype":"BF16","shape":[3,2],"data_offsets":[0,8]}})",
               std::string(16, 'x'));
  ExpectOpenError(p, StatusCode::kDataLoss, {"'w'", "8 bytes", "[3, 2]", "BF16", "needs 12"});
}

TEST_F(SafetensorsTest, BadShapes) {
  auto p = WriteRaw("negdim.safetensors",
                    R"({"w":{"dtype":"F32","shape":[2,-1],"data_offsets":[0,0]}})", "");
  ExpectOpenError(p, StatusCode::kDataLoss, {"'w'", "shape"});
  p = WriteRaw("strdim.safetensors", R"({"w":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})",
               std::string(8, 'x'));
  ExpectOpenError(p, StatusCode::kDataLoss, {"'w'", "shape"});
  p = WriteRaw("overflow.safetensors",
               R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", "");
  ExpectOpenError(p, StatusCode::kDataLoss, {"'w'", "overflows"});
  p = WriteRaw("overflow2.safetensors",
               R"({"w":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})", "");
  ExpectOpenError(p, StatusCode::kDataLoss, {"'w'", "overflows"});
  p = WriteRaw("nodtype.safetensors", R"({"w":{"shape":[1],"data_offsets":[0,4]}})",
               std::string(4, 'x'));
  ExpectOpenError(p, StatusCode::kDataLoss, {"'w'", "dtype"});
}

TEST_F(SafetensorsTest, OverlappingTensors) {
  auto p = WriteRaw("overlap.safetensors",
                    R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                    R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                    std::string(12, 'x'));
  ExpectOpenError(p, StatusCode::kDataLoss, {"'a'", "'b'", "overlap"});
  // Touching is fine; an empty tensor inside another is fine.
  p = WriteRaw("touch.safetensors",
               R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
               R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},)"
               R"("c":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
               std::string(12, 'x'));
  EXPECT_TRUE(SafetensorsFile::Open(p).ok());
}

TEST_F(SafetensorsTest, UnknownDtype) {
  auto p = WriteRaw("f64.safetensors", R"({"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})",
                    std::string(8, 'x'));
  ExpectOpenError(p, StatusCode::kInvalidArgument, {"'w'", "'F64'", "BF16"});
}

TEST_F(SafetensorsTest, BadMetadataAndDuplicates) {
  auto p = WriteRaw("meta.safetensors", R"({"__metadata__":{"format":1}})", "");
  ExpectOpenError(p, StatusCode::kDataLoss, {"__metadata__", "'format'", "string"});
  p = WriteRaw("meta2.safetensors", R"({"__metadata__":"pt"})", "");
  ExpectOpenError(p, StatusCode::kDataLoss, {"__metadata__"});
  p = WriteRaw("dup.safetensors",
               R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
               R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
               std::string(8, 'x'));
  ExpectOpenError(p, StatusCode::kDataLoss, {"'a'", "twice"});
}

TEST_F(SafetensorsTest, WriterRejectsBadInput) {
  auto a = RandomBytes(12, 5);
  fs::path p = dir_ / "w.safetensors";
  Status s = WriteSafetensors(p, {{"t", DType::kF32, {2, 2}, a.data(), a.size()}});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("'t'"));
  EXPECT_THAT(s.message(), HasSubstr("needs 16"));
  s = WriteSafetensors(p, {{"t", DType::kF32, {3}, a.data(), a.size()},
                           {"t", DType::kF32, {3}, a.data(), a.size()}});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("twice"));
  EXPECT_FALSE(fs::exists(p));
  s = WriteSafetensors(dir_ / "no_such_dir" / "x.safetensors",
                       {{"t", DType::kF32, {3}, a.data(), a.size()}});
  EXPECT_FALSE(s.ok());
}

// Flips, overwrites and truncates random bytes of a valid file: Open must return an error or a
// file whose every tensor lies inside the mapping (read fully here, so ASan would catch a
// stray view), never crash.
TEST_F(SafetensorsTest, FuzzCorruptFilesNeverCrash) {
  std::vector<std::vector<uint8_t>> payloads;
  std::vector<SafetensorsTensor> ts;
  const std::vector<std::vector<int64_t>> shapes = {{3, 5}, {7}, {2, 2, 2}, {0}, {1, 9}};
  const DType dtypes[] = {DType::kF32, DType::kBF16, DType::kF16, DType::kI8, DType::kI32};
  for (size_t i = 0; i < shapes.size(); ++i) {
    int64_t n = 1;
    for (int64_t d : shapes[i]) n *= d;
    payloads.push_back(RandomBytes(n * DTypeSize(dtypes[i]), 10 + i));
  }
  for (size_t i = 0; i < shapes.size(); ++i) {
    ts.push_back(
        {fmt::format("t{}", i), dtypes[i], shapes[i], payloads[i].data(), payloads[i].size()});
  }
  fs::path good = dir_ / "good.safetensors";
  ASSERT_TRUE(WriteSafetensors(good, ts, {{"k", "v"}}).ok());
  std::string original;
  {
    std::ifstream in(good, std::ios::binary);
    original.assign(std::istreambuf_iterator<char>(in), {});
  }
  std::mt19937 rng(12345);
  int opened = 0, rejected = 0;
  volatile uint64_t sink = 0;
  fs::path p = dir_ / "fuzz.safetensors";
  for (int iter = 0; iter < 2000; ++iter) {
    std::string bytes = original;
    switch (rng() % 4) {
      case 0: {  // flip a few bits anywhere
        int flips = 1 + rng() % 4;
        for (int k = 0; k < flips; ++k) bytes[rng() % bytes.size()] ^= 1 << (rng() % 8);
        break;
      }
      case 1: {  // overwrite a header byte with a JSON-significant character
        const char kChars[] = "{}[]\":,0123456789-e.\\ x";
        size_t header_end = std::min<size_t>(bytes.size(), 8 + 400);
        bytes[8 + rng() % (header_end - 8)] = kChars[rng() % (sizeof(kChars) - 1)];
        break;
      }
      case 2:  // truncate
        bytes.resize(rng() % bytes.size());
        break;
      default:  // corrupt the length prefix
        bytes[rng() % 8] = static_cast<char>(rng());
        break;
    }
    {
      std::ofstream out(p, std::ios::binary | std::ios::trunc);
      out.write(bytes.data(), bytes.size());
    }
    auto r = SafetensorsFile::Open(p);
    if (!r.ok()) {
      ++rejected;
      EXPECT_THAT(r.status().message(), HasSubstr(p.string()));
      continue;
    }
    ++opened;
    uint64_t sum = 0;
    for (const std::string& name : (*r)->names()) {
      auto v = (*r)->Find(name);
      ASSERT_TRUE(v.ok());
      const uint8_t* d = static_cast<const uint8_t*>(v->data);
      for (size_t k = 0; k < v->nbytes(); ++k) sum += d[k];
    }
    sink = sink + sum;  // reading every byte is the point; keep it from being optimised out
  }
  EXPECT_GT(rejected, 500);
  EXPECT_GT(opened, 50);  // data-only flips keep the file valid
}

// ---- sharded checkpoints ----

TEST_F(SafetensorsTest, ShardedCheckpoint) {
  auto a = RandomBytes(16, 6), b = RandomBytes(8, 7), c = RandomBytes(4, 8);
  ASSERT_TRUE(WriteSafetensors(dir_ / "model-00001-of-00002.safetensors",
                               {{"a", DType::kF32, {4}, a.data(), a.size()},
                                {"b", DType::kF16, {4}, b.data(), b.size()}})
                  .ok());
  fs::create_directories(dir_ / "sub");
  ASSERT_TRUE(WriteSafetensors(dir_ / "sub/model-00002-of-00002.safetensors",
                               {{"c", DType::kBF16, {2}, c.data(), c.size()}})
                  .ok());
  std::ofstream(dir_ / "model.safetensors.index.json") << R"({
    "metadata": {"total_size": 28},
    "weight_map": {"a": "model-00001-of-00002.safetensors",
                   "b": "model-00001-of-00002.safetensors",
                   "c": "sub/model-00002-of-00002.safetensors"}})";
  auto r = SafetensorsCheckpoint::Open(dir_);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->files().size(), 2u);
  EXPECT_THAT(r->names(), ElementsAre("a", "b", "c"));
  auto vc = r->Find("c");
  ASSERT_TRUE(vc.ok());
  EXPECT_EQ(std::memcmp(vc->data, c.data(), 4), 0);
  auto va = r->Find("a");
  ASSERT_TRUE(va.ok());
  EXPECT_EQ(std::memcmp(va->data, a.data(), 16), 0);
  EXPECT_THAT(r->file_of("c")->path().string(), HasSubstr("00002"));
  auto missing = r->Find("d");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("'d'"));
}

TEST_F(SafetensorsTest, IndexNamingAMissingShard) {
  std::ofstream(dir_ / "model.safetensors.index.json")
      << R"({"weight_map": {"a": "model-00001-of-00009.safetensors"}})";
  auto r = SafetensorsCheckpoint::Open(dir_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("model-00001-of-00009.safetensors"));
  EXPECT_THAT(r.status().message(), HasSubstr("'a'"));
}

TEST_F(SafetensorsTest, ShardPathEscapingTheDirectory) {
  auto a = RandomBytes(4, 9);
  fs::create_directories(dir_ / "model");
  ASSERT_TRUE(
      WriteSafetensors(dir_ / "outside.safetensors", {{"a", DType::kF32, {1}, a.data(), 4}}).ok());
  for (std::string shard :
       std::vector<std::string>{"../outside.safetensors", "sub/../../outside.safetensors",
                                (dir_ / "outside.safetensors").string()}) {
    std::ofstream(dir_ / "model/model.safetensors.index.json")
        << fmt::format(R"({{"weight_map": {{"a": "{}"}}}})", shard);
    auto r = SafetensorsCheckpoint::Open(dir_ / "model");
    ASSERT_FALSE(r.ok()) << shard;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr(shard));
    EXPECT_THAT(r.status().message(), HasSubstr("model.safetensors.index.json"));
  }
}

TEST_F(SafetensorsTest, BadIndexes) {
  auto a = RandomBytes(4, 9);
  ASSERT_TRUE(
      WriteSafetensors(dir_ / "s1.safetensors", {{"a", DType::kF32, {1}, a.data(), 4}}).ok());
  const fs::path index = dir_ / "model.safetensors.index.json";
  std::ofstream(index) << R"({"weight_map": {"b": "s1.safetensors"}})";
  auto r = SafetensorsCheckpoint::Open(dir_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss);
  EXPECT_THAT(r.status().message(), HasSubstr("'b'"));
  std::ofstream(index) << R"({"weight_map": ["s1.safetensors"]})";
  r = SafetensorsCheckpoint::Open(dir_);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("weight_map"));
  std::ofstream(index) << R"({"metadata": {}})";
  r = SafetensorsCheckpoint::Open(dir_);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("'weight_map' is missing"));
  std::ofstream(index) << R"({"weight_map": {"a": 3}})";
  r = SafetensorsCheckpoint::Open(dir_);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("weight_map['a']"));
  std::ofstream(index) << R"({"weight_map": )";
  r = SafetensorsCheckpoint::Open(dir_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr(index.string()));
}

TEST_F(SafetensorsTest, NoCheckpointInDirectory) {
  auto r = SafetensorsCheckpoint::Open(dir_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr(dir_.string()));
  EXPECT_THAT(r.status().message(), HasSubstr("model.safetensors"));
}

}  // namespace
}  // namespace qilin
