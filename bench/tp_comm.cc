// Cost of the tensor-parallel collectives between ranks on one host: the in-process group
// (ranks as threads) against the TCP group (ranks as processes, socket_comm.h; here on threads
// over loopback, which is what two processes of one node pay), for the all-reduce sizes one
// layer of a step needs: [tokens, hidden] floats, hidden 3584 (Qwen2.5-7B), 1 to 512 tokens.
//   qilin_bench_tp_comm [--ranks N] [--iters N] [--json]
// Physical floor: every all-reduce moves each rank's count x 4 bytes in and the sum out again;
// the copy bandwidth of this machine (measured here with memcpy) bounds it below.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/comm.h"
#include "runtime/socket_comm.h"

namespace {

using namespace qilin;
using Clock = std::chrono::steady_clock;

std::vector<std::unique_ptr<Communicator>> MakeGroup(const std::string& kind, int n) {
  std::vector<std::unique_ptr<Communicator>> comms(n);
  if (kind == "inprocess") {
    auto group = InProcessCommGroup::Create(n).value();
    for (int r = 0; r < n; ++r) comms[r] = group->Rank(r).value();
    return comms;
  }
  auto listener = SocketCommListener::Listen({"127.0.0.1", 0}).value();
  std::vector<std::thread> joins;
  for (int r = 1; r < n; ++r) {
    joins.emplace_back([&, r] {
      comms[r] = ConnectSocketComm({"127.0.0.1", listener->port()}, r, n, 10).value();
    });
  }
  comms[0] = listener->Accept(n, 10).value();
  for (auto& t : joins) t.join();
  return comms;
}

// Microseconds per all-reduce of `count` floats, median of rank 0's timings over `iters`.
double AllReduceUs(const std::string& kind, int n, int64_t count, int iters) {
  auto comms = MakeGroup(kind, n);
  std::vector<double> us(iters);
  std::vector<std::thread> ranks;
  for (int r = 0; r < n; ++r) {
    ranks.emplace_back([&, r] {
      std::vector<float> data(count, 1.0f);
      for (int i = 0; i < iters + 5; ++i) {
        const auto t0 = Clock::now();
        if (!comms[r]->AllReduceSum(data.data(), count).ok()) std::abort();
        if (r == 0 && i >= 5) {
          us[i - 5] = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
        }
      }
    });
  }
  for (auto& t : ranks) t.join();
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

double CopyGBs() {
  std::vector<char> a(256 << 20, 1), b(256 << 20);
  double best = 0;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = Clock::now();
    std::memcpy(b.data(), a.data(), a.size());
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    best = std::max(best, 2.0 * a.size() / s / 1e9);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  int n = 2, iters = 200;
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--ranks" && i + 1 < argc) {
      n = std::atoi(argv[++i]);
    } else if (a == "--iters" && i + 1 < argc) {
      iters = std::atoi(argv[++i]);
    } else if (a == "--json") {
      json = true;
    } else {
      std::fprintf(stderr, "usage: qilin_bench_tp_comm [--ranks N] [--iters N] [--json]\n");
      return 2;
    }
  }
  if (n < 2 || n > 64 || iters < 1) {
    std::fprintf(stderr, "qilin_bench_tp_comm: --ranks must be in [2, 64], --iters >= 1\n");
    return 2;
  }
  const double copy = CopyGBs();
  nlohmann::json out = {{"ranks", n}, {"copy_GBps", copy}, {"rows", nlohmann::json::array()}};
  if (!json) {
    std::printf("all-reduce of [tokens, 3584] f32 over %d ranks, median of %d; memcpy %.1f GB/s\n",
                n, iters, copy);
    std::printf("%8s %10s %14s %14s %12s\n", "tokens", "bytes", "threads (us)", "tcp (us)",
                "floor (us)");
  }
  for (int64_t tokens : {1, 8, 64, 512}) {
    const int64_t count = tokens * 3584;
    const double in_process = AllReduceUs("inprocess", n, count, iters);
    const double tcp = AllReduceUs("socket", n, count, iters);
    // Each rank reads and writes its count floats at least once: 2 x bytes at copy bandwidth.
    const double floor_us = 2.0 * count * 4 / (copy * 1e9) * 1e6;
    out["rows"].push_back({{"tokens", tokens},
                           {"bytes", count * 4},
                           {"inprocess_us", in_process},
                           {"socket_us", tcp},
                           {"floor_us", floor_us}});
    if (!json) {
      std::printf("%8ld %10ld %14.1f %14.1f %12.1f\n", static_cast<long>(tokens),
                  static_cast<long>(count * 4), in_process, tcp, floor_us);
    }
  }
  if (json) std::printf("%s\n", out.dump(2).c_str());
  return 0;
}
