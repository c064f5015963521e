// NCCL communicator on real GPUs (label gpu): one rank on device 0, then one rank per visible GPU
// (a thread each; skipped with fewer than 2). All-reduce, all-gather and broadcast against host
// references computed here (sums in double, rounded once: NCCL's ring order is not rank order).
#include <cuda_runtime.h>

#include <cmath>
#include <random>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#ifdef QILIN_HAVE_NCCL
#include "runtime/cuda_nccl_comm.h"
#endif

namespace qilin {
namespace {

int DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

#ifdef QILIN_HAVE_NCCL

std::vector<float> RankData(int rank, int64_t count) {
  std::mt19937 rng(99 + rank);
  std::normal_distribution<float> d(0.0f, 2.0f);
  std::vector<float> v(count);
  for (float& x : v) x = d(rng);
  return v;
}

// Each rank's results, copied back to the host.
struct RankOut {
  Status init, reduce, gather, bcast, barrier;
  std::vector<float> reduced, gathered;
  std::vector<int64_t> host_bcast;
};

// All ranks of `n` on devices 0..n-1, one thread each; `count` floats per rank.
std::vector<RankOut> RunGroup(int n, int64_t count) {
  std::vector<RankOut> out(n);
  auto id = NcclUniqueId();
  EXPECT_TRUE(id.ok()) << id.status().ToString();
  if (!id.ok()) return out;
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      RankOut& o = out[r];
      auto comm = NcclCommunicator::Create(n, r, *id, r);
      o.init = comm.ok() ? Status::Ok() : comm.status();
      if (!comm.ok()) return;
      NcclCommunicator& c = **comm;
      const std::vector<float> mine = RankData(r, count);
      float* d_data = nullptr;
      float* d_all = nullptr;
      cudaSetDevice(r);
      cudaMalloc(&d_data, count * sizeof(float));
      cudaMalloc(&d_all, n * count * sizeof(float));
      cudaMemcpy(d_data, mine.data(), count * sizeof(float), cudaMemcpyHostToDevice);
      o.gather = c.AllGather(d_data, count, d_all);
      o.reduce = c.AllReduceSum(d_data, count);
      o.reduced.resize(count);
      o.gathered.resize(n * count);
      cudaMemcpy(o.reduced.data(), d_data, count * sizeof(float), cudaMemcpyDeviceToHost);
      cudaMemcpy(o.gathered.data(), d_all, n * count * sizeof(float), cudaMemcpyDeviceToHost);
      // Host memory broadcast (a step's batch metadata), staged through the device.
      o.host_bcast.assign(1000, r == 0 ? 0 : -1);
      if (r == 0) {
        for (int i = 0; i < 1000; ++i) o.host_bcast[i] = int64_t{i} * i - 7;
      }
      o.bcast = c.Broadcast(o.host_bcast.data(), 1000 * sizeof(int64_t), 0);
      o.barrier = c.Barrier();
      cudaFree(d_data);
      cudaFree(d_all);
    });
  }
  for (auto& t : threads) t.join();
  return out;
}

void CheckGroup(int n, int64_t count) {
  const std::vector<RankOut> out = RunGroup(n, count);
  std::vector<double> sum(count, 0.0);
  std::vector<float> all;
  double scale = 0;
  for (int r = 0; r < n; ++r) {
    const auto v = RankData(r, count);
    for (int64_t i = 0; i < count; ++i) {
      sum[i] += v[i];
      scale = std::max(scale, std::abs(static_cast<double>(v[i])));
    }
    all.insert(all.end(), v.begin(), v.end());
  }
  for (int r = 0; r < n; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r) + " of " + std::to_string(n));
    ASSERT_TRUE(out[r].init.ok()) << out[r].init.ToString();
    ASSERT_TRUE(out[r].reduce.ok()) << out[r].reduce.ToString();
    ASSERT_TRUE(out[r].gather.ok()) << out[r].gather.ToString();
    ASSERT_TRUE(out[r].bcast.ok()) << out[r].bcast.ToString();
    ASSERT_TRUE(out[r].barrier.ok()) << out[r].barrier.ToString();
    double worst = 0;
    for (int64_t i = 0; i < count; ++i) {
      ASSERT_FALSE(std::isnan(out[r].reduced[i]));
      worst = std::max(worst, std::abs(out[r].reduced[i] - sum[i]));
    }
    // n - 1 f32 additions of values up to `scale` in some order.
    EXPECT_LE(worst, n * scale * 1.2e-7 * n) << "worst abs error " << worst;
    EXPECT_EQ(out[r].gathered, all);
    for (int i = 0; i < 1000; ++i) ASSERT_EQ(out[r].host_bcast[i], int64_t{i} * i - 7);
    // Every rank holds the same sums (what keeps replicated activations identical).
    EXPECT_EQ(out[r].reduced, out[0].reduced);
  }
}

TEST(CudaNcclTest, OneRankAllReduceIsTheIdentity) {
  if (DeviceCount() < 1) GTEST_SKIP() << "no CUDA device";
  CheckGroup(1, 4097);
}

TEST(CudaNcclTest, EveryVisibleGpuAllReduces) {
  const int n = DeviceCount();
  if (n < 2) GTEST_SKIP() << n << " CUDA device(s); a multi-GPU group needs at least 2";
  for (int64_t count : {int64_t{1}, int64_t{1000}, int64_t{1} << 22}) CheckGroup(n, count);
}

TEST(CudaNcclTest, BadArgumentsAreRefused) {
  if (DeviceCount() < 1) GTEST_SKIP() << "no CUDA device";
  auto id = NcclUniqueId();
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  auto bad_rank = NcclCommunicator::Create(2, 2, *id, 0);
  ASSERT_FALSE(bad_rank.ok());
  EXPECT_NE(bad_rank.status().message().find("rank 2"), std::string::npos);
  auto bad_id = NcclCommunicator::Create(1, 0, "short", 0);
  ASSERT_FALSE(bad_id.ok());
  EXPECT_NE(bad_id.status().message().find("unique id has 5 bytes"), std::string::npos);
  auto bad_dev = NcclCommunicator::Create(1, 0, *id, DeviceCount());
  ASSERT_FALSE(bad_dev.ok());
  EXPECT_NE(bad_dev.status().message().find("CUDA device"), std::string::npos);
}

#else

TEST(CudaNcclTest, BuiltWithoutNccl) { GTEST_SKIP() << "this build has no NCCL"; }

#endif

}  // namespace
}  // namespace qilin
