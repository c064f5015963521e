// `qilin tp-worker`: one following rank of a tensor-parallel group, spawned by rank 0 under
// `--tp-launch process` (runtime/tp_launch.h). Not for direct use, but runnable by hand or by
// another launcher: it joins rank 0 at --tp-master, makes its shard and runs rank 0's calls until
// rank 0 shuts the group down.
#include <cstdio>

#include <spdlog/spdlog.h>

#include "cli/command.h"
#include "common/dtype.h"
#include "common/status.h"
#include "runtime/tp_launch.h"

namespace qilin::cli {
namespace {

struct Options {
  TpModelSource source;
  std::string dtype = "BF16";
  std::string device = "cpu";
  int cuda_device = 0;
  int tp = 2;
  int rank = 1;
  std::string master;
  double join_timeout_s = 300;
};

RegisterCommand reg(
    "tp-worker", "A following rank of `--tp N --tp-launch process` (spawned by rank 0)",
    [](CLI::App& sub) {
      auto o = std::make_shared<Options>();
      sub.add_option("--model", o->source.model_dir, "model directory (config.json)")->required();
      sub.add_option("--tp", o->tp, "ranks in the group")->check(CLI::Range(2, 64))->required();
      sub.add_option("--tp-rank", o->rank, "this rank (1 .. tp-1)")->required();
      sub.add_option("--tp-master", o->master, "rank 0's HOST:PORT")->required();
      sub.add_option("--device", o->device, "cpu or cuda")
          ->check(CLI::IsMember({"cpu", "cuda"}))
          ->capture_default_str();
      sub.add_option("--cuda-device", o->cuda_device, "GPU of this rank")->capture_default_str();
      sub.add_flag("--dummy-weights", o->source.dummy_weights, "random weights (as rank 0's)");
      sub.add_option("--dtype", o->dtype, "dtype of --dummy-weights")->capture_default_str();
      sub.add_option("--seed", o->source.seed, "seed of --dummy-weights")->capture_default_str();
      sub.add_option("--max-model-len", o->source.max_model_len, "as rank 0's");
      sub.add_option("--join-timeout", o->join_timeout_s, "seconds to reach rank 0")
          ->capture_default_str();
      return [o]() {
        if (o->rank < 1 || o->rank >= o->tp) {
          throw Error(InvalidArgument("--tp-rank {} is outside [1, {})", o->rank, o->tp));
        }
        if (!ParseDType(o->dtype, &o->source.dtype) ||
            (o->source.dtype != DType::kF32 && o->source.dtype != DType::kF16 &&
             o->source.dtype != DType::kBF16)) {
          throw Error(InvalidArgument("--dtype '{}' is not F32, F16 or BF16", o->dtype));
        }
        // Every line of this rank's log says which rank it is.
        spdlog::set_pattern(fmt::format("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] [rank {}] %v", o->rank));
        Status st = RunTpWorker(o->device, o->cuda_device, o->source, o->tp, o->rank, o->master,
                                o->join_timeout_s);
        if (!st.ok()) throw Error(st);
        return 0;
      };
    });

}  // namespace
}  // namespace qilin::cli
