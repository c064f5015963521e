#include "kernels/cuda/pdl.cuh"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace qilin::cuda {

namespace {
std::atomic<int> g_override{-1};
}  // namespace

void SetPdlOverride(int on) { g_override.store(on < 0 ? -1 : (on ? 1 : 0)); }

bool PdlEnabled() {
  const int o = g_override.load(std::memory_order_relaxed);
  if (o == 0) return false;
  static const bool allowed = [] {
    const char* v = std::getenv("QILIN_PDL");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  if (!allowed && o != 1) return false;
  // 0: not looked up yet, 1: no, 2: yes; per device ordinal.
  static std::atomic<int> cached[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  int v = cached[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    v = major >= 9 ? 2 : 1;
    cached[dev].store(v, std::memory_order_relaxed);
  }
  return v == 2;
}

}  // namespace qilin::cuda
