// `qilin generate --tp N --device cpu` on the demo model (4 query heads, 2 KV heads, tied
// embeddings, a 151936-token vocabulary): greedy output with --tp 2 and --tp 4 (KV heads
// replicated) equals --tp 1, the unsharded CPU backend; a size that does not divide the heads is
// a one-line error naming the key, its value and the size.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

namespace qilin {
namespace {

namespace fs = std::filesystem;

struct RunResult {
  int status;
  std::string out;
};

// A shell command's stdout and wait status.
RunResult RunCommand(const std::string& cmd) {
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  return {pclose(p), out};
}

// `qilin generate` on the demo model with `args`: stdout, or with `errors` stderr alone.
RunResult RunTp(const std::string& args, bool errors = false, const std::string& device = "cpu",
                const std::string& prefix = "") {
  return RunCommand(prefix + std::string(QILIN_BINARY_DIR) + "/qilin generate --model " +
                    QILIN_SOURCE_DIR + "/models/demo --device " + device + " " + args +
                    (errors ? " 2>&1 >/dev/null" : " 2>/dev/null"));
}

class TpGenerateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(std::string(QILIN_BINARY_DIR) + "/qilin")) {
      GTEST_SKIP() << "the qilin binary is not built (build the `qilin` target)";
    }
  }
};

TEST_F(TpGenerateTest, GreedyOutputWithTp2AndTp4EqualsTp1) {
  const std::string prompt =
      "--prompt-ids 785,3974,13876,38835,34208,916,279,15678,5562,13 "
      "--max-tokens 24 --ignore-eos";
  const RunResult one = RunTp(prompt + " --tp 1");
  ASSERT_EQ(one.status, 0) << one.out;
  ASSERT_NE(one.out.find("\"token_ids\""), std::string::npos) << one.out;
  for (int tp : {2, 4}) {
    const RunResult r = RunTp(prompt + " --tp " + std::to_string(tp));
    ASSERT_EQ(r.status, 0) << r.out;
    EXPECT_EQ(r.out, one.out) << "--tp " << tp;
  }
}

TEST_F(TpGenerateTest, ASizeThatDoesNotDivideIsAClearError) {
  const RunResult r = RunTp("--prompt-ids 1,2,3 --tp 3", /*errors=*/true);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.out.find("num_attention_heads = 4"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("size 3"), std::string::npos) << r.out;
  const RunResult zero = RunTp("--prompt-ids 1,2,3 --tp 0", /*errors=*/true);
  EXPECT_NE(zero.status, 0);
  EXPECT_NE(zero.out.find("--tp: Value 0 not in range 1 to 64"), std::string::npos) << zero.out;
}

// Ranks as processes: spawned `qilin tp-worker`s (--tp-launch process) and, where OpenMPI is
// installed, `mpirun -np N qilin generate --tp-launch mpi`: the same tokens as --tp 1.
TEST_F(TpGenerateTest, ProcessAndMpirunRanksEqualTp1) {
  const std::string prompt =
      "--prompt-ids 785,3974,13876,38835,34208,916,279,15678,5562,13 "
      "--max-tokens 24 --ignore-eos";
  const RunResult one = RunTp(prompt + " --tp 1");
  ASSERT_EQ(one.status, 0) << one.out;
  for (int tp : {2, 4}) {
    const RunResult r = RunTp(prompt + " --tp-launch process --tp " + std::to_string(tp));
    ASSERT_EQ(r.status, 0) << r.out;
    EXPECT_EQ(r.out, one.out) << "--tp " << tp << " --tp-launch process";
  }
  if (std::system("command -v mpirun >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << "mpirun not installed (openmpi-bin): the mpi launch is not run";
  }
  const RunResult mpi = RunTp(
      prompt + " --tp-launch mpi --tp-master 127.0.0.1:" + std::to_string(29600 + getpid() % 300),
      false, "cpu",
      "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "
      "OMPI_MCA_rmaps_base_oversubscribe=1 timeout 120 mpirun -np 2 ");
  ASSERT_EQ(mpi.status, 0) << mpi.out;
  EXPECT_EQ(mpi.out, one.out) << "mpirun -np 2";
}

TEST_F(TpGenerateTest, LaunchErrorsNameTheFlagAndTheValue) {
  const RunResult no_mpi = RunTp("--prompt-ids 1,2,3 --tp 2 --tp-launch mpi", true);
  EXPECT_NE(no_mpi.status, 0);
  EXPECT_NE(no_mpi.out.find("start it with `mpirun -np 2 qilin ...`"), std::string::npos)
      << no_mpi.out;
  const RunResult sizes = RunTp("--prompt-ids 1,2,3 --tp 2 --tp-launch mpi", true, "cpu",
                                "QILIN_TP_RANK=0 QILIN_TP_WORLD_SIZE=3 ");
  EXPECT_NE(sizes.status, 0);
  EXPECT_NE(sizes.out.find("mpirun started 3 processes (this is rank 0) but --tp is 2"),
            std::string::npos)
      << sizes.out;
  const RunResult forgot =
      RunTp("--prompt-ids 1,2,3", true, "cpu", "OMPI_COMM_WORLD_RANK=1 OMPI_COMM_WORLD_SIZE=2 ");
  EXPECT_NE(forgot.status, 0);
  EXPECT_NE(forgot.out.find("started as rank 1 of 2 (mpirun), but --tp-launch is 'thread': add "
                            "--tp-launch mpi"),
            std::string::npos)
      << forgot.out;
  const RunResult master =
      RunTp("--prompt-ids 1,2,3 --tp 2 --tp-launch process --tp-master x", true);
  EXPECT_NE(master.status, 0);
  EXPECT_NE(master.out.find("--tp-master 'x' is not HOST:PORT"), std::string::npos) << master.out;
  const RunResult launch = RunTp("--prompt-ids 1,2,3 --tp 2 --tp-launch fork", true);
  EXPECT_NE(launch.status, 0);
  EXPECT_NE(launch.out.find("--tp-launch"), std::string::npos) << launch.out;
}

// Where no GPU is visible (or the binary has no CUDA), `--tp 2 --device cuda` exits with a
// one-line error naming the flag and the device, not a crash.
TEST_F(TpGenerateTest, CudaWithoutAGpuIsAClearError) {
  const RunResult r = RunTp("--prompt-ids 1,2,3 --max-tokens 2 --tp 2", /*errors=*/true, "cuda");
  if (r.status == 0) GTEST_SKIP() << "a GPU is visible: tests/runtime/cuda_tp_backend_test.cc";
  ASSERT_TRUE(WIFEXITED(r.status)) << "killed by a signal: " << r.out;
  EXPECT_NE(WEXITSTATUS(r.status), 0);
  EXPECT_NE(r.out.find("--tp 2 on device 'cuda'"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace qilin
