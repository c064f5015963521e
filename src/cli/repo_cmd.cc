// qilin repo init: writes a complete Triton model repository (ensemble, preprocessing,
// tensorrt_llm, postprocessing; no ${...} placeholders) for a checkpoint, which
// `qilin serve REPO` serves and Triton's clients talk to unchanged.
#include <cstdio>
#include <memory>

#include "cli/command.h"
#include "server/model_repository.h"

namespace qilin::cli {
namespace {

RegisterCommand reg(
    "repo", "Triton model repositories: `qilin repo init --model DIR --out REPO`",
    [](CLI::App& sub) {
      auto opts = std::make_shared<server::RepoInitOptions>();
      auto out = std::make_shared<std::string>();
      sub.require_subcommand(1);
      CLI::App* init = sub.add_subcommand("init", "Write a complete model repository for a model");
      init->add_option("--model", opts->model_dir, "Hugging Face checkpoint folder")->required();
      init->add_option("--out", *out, "Repository folder to write (must not hold configs)")
          ->required();
      init->add_option("--max-batch-size", opts->max_batch_size, "max_batch_size of every model")
          ->capture_default_str();
      init->add_flag("!--no-decoupled", opts->decoupled,
                     "Write decoupled: false (no streaming; one response per request)");
      init->add_option("--max-tokens-in-paged-kv-cache", opts->max_tokens_in_paged_kv_cache,
                       "KV cache size in tokens (default: from memory)");
      init->add_option("--kv-cache-free-gpu-mem-fraction", opts->kv_cache_free_gpu_mem_fraction,
                       "Fraction of free memory for the KV cache")
          ->capture_default_str();
      init->add_option("--batch-scheduler-policy", opts->batch_scheduler_policy,
                       "max_utilization or guaranteed_no_evict")
          ->capture_default_str();
      init->add_option("--max-queue-size", opts->max_queue_size,
                       "Requests queued at most (RESOURCE_EXHAUSTED beyond); 0: no limit")
          ->capture_default_str();
      return [opts, out]() {
        Status s = server::WriteModelRepository(*opts, *out);
        if (!s.ok()) throw Error(s);
        // Check what was written loads back.
        auto repo = server::LoadModelRepository(*out);
        if (!repo.ok()) throw Error(repo.status());
        std::printf(
            "wrote %s: ensemble, preprocessing, tensorrt_llm, postprocessing (serve it with "
            "`qilin serve %s`)\n",
            out->c_str(), out->c_str());
        return 0;
      };
    });

}  // namespace
}  // namespace qilin::cli
