#include "cli/tp_flags.h"

#include <cstdio>

#include "common/status.h"

namespace qilin::cli {

void AddTpFlags(CLI::App& sub, TpFlags* flags, const std::string& tp_help) {
  sub.add_option("--tp", flags->tp, tp_help)->check(CLI::Range(1, 64))->capture_default_str();
  sub.add_option("--tp-launch", flags->launch.mode,
                 "where ranks run: thread (this process), process (spawned `qilin tp-worker` "
                 "processes), mpi (started by `mpirun -np N`)")
      ->check(CLI::IsMember({"thread", "process", "mpi"}))
      ->capture_default_str();
  sub.add_option("--tp-master", flags->launch.master,
                 "HOST:PORT where rank 0 meets the other ranks (process: 127.0.0.1:0, a free "
                 "port; mpi: 127.0.0.1:29531; across nodes rank 0's address)");
}

std::optional<int> RunIfTpFollower(TpFlags* flags, const std::string& device,
                                   const TpModelSource& source) {
  const std::optional<MpiPlace> env = MpiPlaceFromEnvironment();
  if (flags->launch.mode != "mpi" && env && env->world_size > 1) {
    // N copies of a server would fight over its ports.
    throw Error(InvalidArgument(
        "this process was started as rank {} of {} (mpirun), but --tp-launch is '{}': add "
        "--tp-launch mpi",
        env->rank, env->world_size, flags->launch.mode));
  }
  if (flags->launch.mode == "mpi" && flags->tp == 1 && env) flags->tp = env->world_size;
  if (Status st = CheckTpLaunch(flags->launch, flags->tp); !st.ok()) throw Error(st);
  if (!IsMpiFollower(flags->launch)) return std::nullopt;
  if (Status st = RunMpiFollower(device, source, flags->tp, flags->launch); !st.ok()) {
    std::fprintf(stderr, "qilin: tensor parallel rank %d: error: %s\n", env->rank,
                 st.message().c_str());
    return 1;
  }
  return 0;
}

}  // namespace qilin::cli
