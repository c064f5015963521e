// `qilin bench`: a serving benchmark of synthetic requests, against
//   the engine in-process   qilin bench --model DIR [--dummy-weights] [--device cpu|cuda|auto]
//   a server over HTTP      qilin bench --url http://HOST:8000     (OpenAI streaming completions)
//   a server over gRPC      qilin bench --grpc HOST:8001           (KServe v2, tensorrt_llm)
// with fixed or random lengths (--input-len --output-len --range-ratio), all at once or at a
// Poisson --request-rate, at most --concurrency in flight. Prints TTFT, inter-token latency,
// TPOT and end-to-end latency (mean, p50, p90, p99) and request / token throughput; --json for
// tools.
#include <algorithm>
#include <chrono>
#include <iostream>
#include <memory>
#include <string>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "bench/stats.h"
#include "bench/targets.h"
#include "bench/workload.h"
#include "cli/command.h"
#include "cli/tp_flags.h"
#include "engine/engine.h"
#include "model/config.h"
#include "model/weights.h"
#include "runtime/backend_factory.h"

namespace qilin::cli {
namespace {

struct BenchOptions {
  std::string model_dir;
  bool dummy_weights = false;
  bool no_overlap = false;
  bool no_warmup = false;
  std::string device = "auto";
  TpFlags tpf;  // in-process: tensor parallel ranks and where they run
  std::string url;
  std::string grpc;
  std::string served_model;
  std::string api_key;
  bench::WorkloadOptions workload;
  int64_t vocab = 0;
  int64_t concurrency = 0;
  int32_t max_batch_size = 256;
  int32_t max_num_tokens = 8192;
  int64_t kv_cache_tokens = 0;
  bool json = false;
};

template <typename T>
T OrThrow(Result<T> r) {
  if (!r.ok()) throw Error(r.status());
  return std::move(r).value();
}

int RunBench(BenchOptions o) {
  const int targets = !o.model_dir.empty() + !o.url.empty() + !o.grpc.empty();
  if (targets != 1) {
    throw Error(InvalidArgument(
        "give one target: --model DIR (in-process), --url http://HOST:PORT or --grpc HOST:PORT"));
  }
  if (o.concurrency < 0) throw Error(OutOfRange("--concurrency {} is negative", o.concurrency));

  std::unique_ptr<Backend> backend;
  std::unique_ptr<Engine> engine;
  bench::RequestRunner runner;
  nlohmann::json setup;
  if (!o.model_dir.empty()) {
    const ModelConfig config = OrThrow(LoadModelConfig(o.model_dir));
    o.workload.vocab = o.vocab > 0 ? o.vocab : std::min<int64_t>(config.vocab_size, 30000);
    if (o.workload.vocab > config.vocab_size) {
      throw Error(OutOfRange("--vocab-size {} is over the model's {}", o.workload.vocab,
                             config.vocab_size));
    }
    const int64_t longest =
        static_cast<int64_t>(o.workload.input_len * (1 + o.workload.range_ratio)) + 1 +
        static_cast<int64_t>(o.workload.output_len * (1 + o.workload.range_ratio)) + 1;
    if (longest > config.MaxModelLen()) {
      throw Error(OutOfRange(
          "--input-len {} + --output-len {} (with --range-ratio {}) reach {} tokens, over the "
          "model's limit of {}",
          o.workload.input_len, o.workload.output_len, o.workload.range_ratio, longest,
          config.MaxModelLen()));
    }
    TpModelSource source;
    source.model_dir = o.model_dir;
    source.dummy_weights = o.dummy_weights;
    source.dtype =
        (config.dtype == DType::kF16 || config.dtype == DType::kF32) ? config.dtype : DType::kBF16;
    source.seed = o.workload.seed;
    // Under `mpirun -np N qilin bench ... --tp-launch mpi`, ranks > 0 follow rank 0 here.
    if (std::optional<int> rc = RunIfTpFollower(&o.tpf, o.device, source)) return *rc;
    if (o.tpf.tp > 1) {
      backend = OrThrow(LaunchTpBackend(o.device, config, source, o.tpf.tp, o.tpf.launch));
    } else if (o.dummy_weights) {
      backend = OrThrow(MakeDummyBackend(o.device, config, source.dtype, o.workload.seed));
    } else {
      backend =
          OrThrow(MakeBackend(o.device, config, OrThrow(LoadModelWeights(config, o.model_dir))));
    }
    EngineConfig ec;
    ec.overlap_steps = !o.no_overlap;
    ec.max_batch_size = o.max_batch_size;
    ec.max_num_tokens = o.max_num_tokens;
    ec.kv_cache_tokens = o.kv_cache_tokens;
    if (ec.kv_cache_tokens <= 0) {
      // What the workload holds at once, up to half the free memory (beyond, the engine
      // preempts and recomputes, as a server would).
      const int64_t at_once = o.concurrency > 0 ? std::min(o.concurrency, o.workload.num_requests)
                                                : o.workload.num_requests;
      int64_t want = at_once * ((longest + ec.block_size - 1) / ec.block_size + 1) * ec.block_size;
      const Result<int32_t> cap =
          backend->ProposeNumKvBlocks(ec.block_size, 0.5, ec.max_num_tokens);
      if (cap.ok() && *cap > 0) want = std::min<int64_t>(want, int64_t{*cap} * ec.block_size);
      ec.kv_cache_tokens = std::max<int64_t>(want, ec.block_size);
    }
    engine = OrThrow(Engine::Create(*backend, ec));
    int64_t warmup_steps = 0;
    double warmup_s = 0;
    if (!o.no_warmup) {
      const auto t0 = std::chrono::steady_clock::now();
      warmup_steps = OrThrow(engine->WarmUp());
      warmup_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    engine->Start();
    runner = bench::OfflineRunner(engine.get());
    setup = {{"mode", "offline"},
             {"model", o.model_dir},
             {"architecture", config.architecture},
             {"dummy_weights", o.dummy_weights},
             {"device", ResolveDevice(o.device)},
             {"tp", o.tpf.tp},
             {"tp_launch", o.tpf.launch.mode},
             {"max_batch_size", ec.max_batch_size},
             {"kv_cache_blocks", engine->stats().kv_blocks_total},
             {"block_size", ec.block_size},
             {"warmup_steps", warmup_steps},
             {"warmup_s", warmup_s}};
  } else if (!o.url.empty()) {
    o.workload.vocab = o.vocab > 0 ? o.vocab : 30000;
    bench::HttpTarget t = OrThrow(bench::ParseHttpUrl(o.url));
    t.model = o.served_model;
    t.api_key = o.api_key;
    runner = bench::HttpRunner(t);
    setup = {{"mode", "http"}, {"url", o.url}};
  } else {
    o.workload.vocab = o.vocab > 0 ? o.vocab : 30000;
    if (o.grpc.find(':') == std::string::npos) {
      throw Error(InvalidArgument("--grpc '{}': give HOST:PORT (e.g. localhost:8001)", o.grpc));
    }
    runner = bench::GrpcRunner({.address = o.grpc, .model = "tensorrt_llm"});
    setup = {{"mode", "grpc"}, {"target", o.grpc}};
  }
  const auto requests = OrThrow(bench::MakeWorkload(o.workload));
  setup["num_requests"] = o.workload.num_requests;
  setup["input_len"] = o.workload.input_len;
  setup["output_len"] = o.workload.output_len;
  setup["range_ratio"] = o.workload.range_ratio;
  setup["request_rate"] =
      o.workload.request_rate > 0 ? nlohmann::json(o.workload.request_rate) : nlohmann::json("inf");
  setup["concurrency"] = o.concurrency > 0 ? nlohmann::json(o.concurrency) : nlohmann::json("inf");
  if (!o.json) {
    std::cerr << "bench: " << setup.dump() << "\n";
  }
  const auto records = bench::RunWorkload(requests, o.concurrency, runner);
  if (engine) engine->Stop();
  const bench::Summary s = bench::Summarize(records);
  if (o.json) {
    nlohmann::json j = bench::ToJson(s);
    j["setup"] = setup;
    std::cout << j.dump(2) << "\n";
  } else {
    std::cout << bench::FormatTable(s);
  }
  return s.failed == 0 ? 0 : 1;
}

RegisterCommand reg(
    "bench", "serving benchmark: TTFT, inter-token latency, throughput (in-process, HTTP or gRPC)",
    [](CLI::App& sub) {
      auto o = std::make_shared<BenchOptions>();
      sub.add_option("--model", o->model_dir,
                     "in-process: model directory (config.json + weights)");
      sub.add_flag("--dummy-weights", o->dummy_weights,
                   "in-process: random weights from config.json");
      sub.add_option("--device", o->device, "in-process: cpu, cuda or auto")->capture_default_str();
      sub.add_flag("--no-overlap", o->no_overlap,
                   "in-process: run engine steps one at a time (no host work overlapped with the "
                   "device's step)");
      sub.add_flag("--no-warmup", o->no_warmup,
                   "in-process: measure from a cold engine (no warm-up steps before the workload)");
      AddTpFlags(sub, &o->tpf, "in-process: tensor parallel ranks (one GPU each on cuda)");
      sub.add_option("--url", o->url, "a running server's HTTP URL (OpenAI streaming completions)");
      sub.add_option("--grpc", o->grpc,
                     "a running server's gRPC HOST:PORT (KServe v2 tensorrt_llm)");
      sub.add_option("--served-model-name", o->served_model, "HTTP: the request's model");
      sub.add_option("--api-key", o->api_key, "HTTP: Bearer key");
      sub.add_option("--num-requests", o->workload.num_requests, "requests to send")
          ->capture_default_str();
      sub.add_option("--input-len", o->workload.input_len, "prompt tokens")->capture_default_str();
      sub.add_option("--output-len", o->workload.output_len, "output tokens (end tokens ignored)")
          ->capture_default_str();
      sub.add_option("--range-ratio", o->workload.range_ratio,
                     "lengths uniform in len*(1-r)..len*(1+r); 0: fixed")
          ->capture_default_str();
      sub.add_option("--request-rate", o->workload.request_rate,
                     "Poisson arrivals per second; 0: all at once")
          ->capture_default_str();
      sub.add_option("--concurrency", o->concurrency, "requests in flight at most; 0: no limit")
          ->capture_default_str();
      sub.add_option("--seed", o->workload.seed, "seed of the prompts and arrivals")
          ->capture_default_str();
      sub.add_option("--vocab-size", o->vocab,
                     "prompt ids are drawn from [0, N) (default: min(vocab, 30000))");
      sub.add_option("--max-batch-size", o->max_batch_size, "in-process: sequences at once")
          ->capture_default_str();
      sub.add_option("--max-num-tokens", o->max_num_tokens, "in-process: tokens per step")
          ->capture_default_str();
      sub.add_option("--kv-cache-tokens", o->kv_cache_tokens,
                     "in-process: KV pool size in tokens (default: what the workload holds)");
      sub.add_flag("--json", o->json, "print the results as JSON");
      return [o]() { return RunBench(*o); };
    });

}  // namespace
}  // namespace qilin::cli
