// The tensor-parallel flags that `serve` and `generate` share (--tp, --tp-launch, --tp-master),
// and what a following rank of an mpirun launch does instead of the command.
#pragma once

#include <optional>
#include <string>

#include <CLI/CLI.hpp>

#include "runtime/tp_launch.h"

namespace qilin::cli {

struct TpFlags {
  int tp = 1;
  TpLaunchOptions launch;
};

// `tp_help` describes --tp for the command.
void AddTpFlags(CLI::App& sub, TpFlags* flags, const std::string& tp_help);

// Checks the flags (a one-line error naming the bad value) and, under `--tp-launch mpi` with a
// rank > 0, runs this process as a following rank (RunTpWorker) and returns its exit code;
// nullopt when the command should go on (rank 0, or not an mpi launch). Under mpi without --tp,
// --tp becomes mpirun's world size.
std::optional<int> RunIfTpFollower(TpFlags* flags, const std::string& device,
                                   const TpModelSource& source);

}  // namespace qilin::cli
