// `qilin serve [MODEL_DIR]`: the OpenAI-compatible HTTP API (port 8000), health probes, and
// Prometheus metrics (port 8002) over one ModelPipeline. With no MODEL_DIR: the bundled demo.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <spdlog/spdlog.h>

#include "cli/command.h"
#include "cli/tp_flags.h"
#include "pipeline/pipeline.h"
#include "server/grpc_server.h"
#include "server/http_server.h"
#include "server/kserve_http.h"
#include "server/metrics.h"
#include "server/model_repository.h"
#include "server/openai_api.h"
#include "server/triton_models.h"

namespace qilin::cli {
namespace {

namespace fs = std::filesystem;

struct ServeOptions {
  std::string model_dir;
  std::string host = "0.0.0.0";
  int http_port = 8000;
  int grpc_port = 8001;
  int metrics_port = 8002;
  std::string device = "auto";
  std::string served_model_name;
  std::string api_key;
  int32_t max_batch_size = 256;
  int32_t max_num_tokens = 8192;
  int64_t kv_cache_tokens = 0;
  double kv_cache_free_mem_fraction = 0.9;
  int32_t block_size = 32;
  bool no_prefix_cache = false;
  bool no_overlap = false;
  bool no_warmup = false;
  int64_t max_model_len = 0;
  int32_t max_queue = 1024;
  int http_threads = 2;
  int64_t max_body_bytes = 8 << 20;
  int64_t header_timeout_ms = 10000;
  int64_t shutdown_grace_ms = 10000;
  bool no_access_log = false;
  bool dummy_weights = false;
  std::string tokenizer_dir;
  TpFlags tpf;
};

// The demo model: $QILIN_DEMO_MODEL, else models/demo beside the executable's tree
// (build/release/qilin -> ../../models/demo), else the source tree this binary was built from.
std::string FindDemoModel() {
  if (const char* env = std::getenv("QILIN_DEMO_MODEL"); env && *env) {
    spdlog::info("serve: no MODEL_DIR given: the demo model from $QILIN_DEMO_MODEL ({})", env);
    return env;
  }
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (fs::path dir = exe.parent_path(); !dir.empty() && dir != dir.root_path();
         dir = dir.parent_path()) {
      fs::path cand = dir / "models" / "demo";
      if (fs::exists(cand / "config.json")) {
        spdlog::info("serve: no MODEL_DIR given: the bundled demo model next to the binary ({})",
                     cand.string());
        return cand.string();
      }
    }
  }
#ifdef QILIN_SOURCE_DIR
  fs::path src = fs::path(QILIN_SOURCE_DIR) / "models" / "demo";
  if (fs::exists(src / "config.json")) {
    spdlog::info("serve: no MODEL_DIR given: the demo model of the source tree ({})", src.string());
    return src.string();
  }
#endif
  throw Error(
      NotFound("no MODEL_DIR given and the demo model was not found (looked beside the "
               "executable, in the source tree; set $QILIN_DEMO_MODEL)"));
}

// A port a server will bind: fails early (before loading the model) when it is taken.
void CheckPortFree(const std::string& host, int port, const char* flag) {
  if (port == 0) return;
  int fd = ::socket(host.find(':') != std::string::npos ? AF_INET6 : AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return;
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  bool in_use = false;
  if (host.find(':') != std::string::npos) {
    sockaddr_in6 a{};
    a.sin6_family = AF_INET6;
    a.sin6_port = htons(static_cast<uint16_t>(port));
    if (::inet_pton(AF_INET6, host.c_str(), &a.sin6_addr) == 1) {
      in_use = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 && errno == EADDRINUSE;
    }
  } else {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    if (::inet_pton(AF_INET, host.c_str(), &a.sin_addr) == 1) {
      in_use = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 && errno == EADDRINUSE;
    } else {
      ::close(fd);
      throw Error(InvalidArgument("--host '{}' is not an IP address", host));
    }
  }
  ::close(fd);
  if (in_use) {
    throw Error(Unavailable("port {} is in use ({} to choose another)", port, flag));
  }
}

void CheckPort(int port, const char* flag) {
  if (port < 0 || port > 65535) {
    throw Error(InvalidArgument("{} {} is not a port (0..65535)", flag, port));
  }
}

const char* EndpointLabel(const std::string& path) {
  static const char* kKnown[] = {"/v1/models",      "/v1/completions",  "/v1/chat/completions",
                                 "/v2/health/live", "/v2/health/ready", "/metrics"};
  for (const char* k : kKnown) {
    if (path == k) return k;
  }
  if (path.rfind("/v2/", 0) == 0) return "/v2";
  return "other";
}

int RunServe(ServeOptions o) {
  // A following rank of `mpirun -np N qilin serve ... --tp-launch mpi` serves nothing: it runs
  // its shard of the model for rank 0 (which owns the ports, the engine and the protocols).
  if (IsMpiFollower(o.tpf.launch)) {
    TpModelSource source;
    source.model_dir = o.model_dir.empty() ? FindDemoModel() : o.model_dir;
    if (server::IsModelRepository(source.model_dir)) {
      auto loaded = server::LoadModelRepository(source.model_dir);
      if (!loaded.ok()) throw Error(loaded.status());
      source.model_dir = loaded->settings.model_dir;
    }
    source.dummy_weights = o.dummy_weights;
    source.max_model_len = o.max_model_len;
    if (std::optional<int> rc = RunIfTpFollower(&o.tpf, o.device, source)) return *rc;
  }
  (void)RunIfTpFollower(&o.tpf, o.device, {});  // checks the flags; mpi: --tp from mpirun
  CheckPort(o.http_port, "--http-port");
  CheckPort(o.grpc_port, "--grpc-port");
  CheckPort(o.metrics_port, "--metrics-port");
  if (o.http_port != 0 && o.http_port == o.metrics_port) {
    throw Error(InvalidArgument("--http-port and --metrics-port are both {}", o.http_port));
  }
  if (o.max_queue < 0) throw Error(InvalidArgument("--max-queue {} must be >= 0", o.max_queue));
  if (o.max_body_bytes <= 0) {
    throw Error(InvalidArgument("--max-body-bytes {} must be > 0", o.max_body_bytes));
  }
  CheckPortFree(o.host, o.http_port, "--http-port");
  CheckPortFree(o.host, o.metrics_port, "--metrics-port");
  if (o.model_dir.empty()) o.model_dir = FindDemoModel();
  if (!fs::is_directory(o.model_dir)) {
    throw Error(NotFound("MODEL_DIR '{}' is not a directory", o.model_dir));
  }
  CheckPortFree(o.host, o.grpc_port, "--grpc-port");
  if (!o.tokenizer_dir.empty() && !fs::is_directory(o.tokenizer_dir)) {
    throw Error(NotFound("--tokenizer '{}' is not a directory", o.tokenizer_dir));
  }
  // The serve argument: a Triton model repository (folders with config.pbtxt) or a checkpoint
  // folder (config.json). A repository's tensorrt_llm parameters configure the engine.
  server::ModelRepository repo;
  const bool from_repo = server::IsModelRepository(o.model_dir);
  if (from_repo) {
    auto loaded = server::LoadModelRepository(o.model_dir);
    if (!loaded.ok()) throw Error(loaded.status());
    repo = std::move(loaded).value();
    spdlog::info("serve: Triton model repository {} ({} models) serving {}", repo.dir,
                 repo.models.size(), repo.settings.model_dir);
    o.model_dir = repo.settings.model_dir;
    // The preprocessing model's tokenizer_dir, unless --tokenizer says otherwise.
    if (o.tokenizer_dir.empty() && repo.settings.tokenizer_dir != o.model_dir) {
      o.tokenizer_dir = repo.settings.tokenizer_dir;
    }
    if (!fs::exists(fs::path(o.model_dir) / "config.json")) {
      throw Error(
          NotFound("gpt_model_path '{}' of the repository has no config.json", o.model_dir));
    }
  } else if (!fs::exists(fs::path(o.model_dir) / "config.json")) {
    throw Error(
        NotFound("MODEL_DIR '{}' is neither a checkpoint (no config.json) nor a Triton "
                 "model repository (no <model>/config.pbtxt)",
                 o.model_dir));
  } else {
    server::RepoInitOptions ro;
    ro.model_dir = o.model_dir;
    ro.max_batch_size = o.max_batch_size;
    auto built = server::BuildModelRepository(o.model_dir, server::MakeRepositoryModels(ro));
    if (!built.ok()) throw Error(built.status());
    repo = std::move(built).value();
  }

  // Signals are taken by sigwait below: block them before any thread starts.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGUSR2);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  // One thread takes the signals: during startup a signal ends the process at once; once
  // serving, the first starts a graceful shutdown and a second cuts the grace short.
  std::mutex sig_mu;
  std::condition_variable sig_cv;
  int signals = 0, first_signal = 0;
  bool serving = false;
  std::thread sig_thread([&] {
    for (;;) {
      int sig = 0;
      if (sigwait(&sigs, &sig) != 0) continue;
      std::lock_guard<std::mutex> lock(sig_mu);
      if (sig == SIGUSR2) return;  // our own wake-up at exit
      if (!serving) {
        std::fprintf(stderr, "qilin serve: interrupted during startup\n");
        std::_Exit(1);
      }
      if (signals++ == 0) first_signal = sig;
      sig_cv.notify_all();
    }
  });
  struct JoinSignals {
    std::thread& t;
    ~JoinSignals() {
      pthread_kill(t.native_handle(), SIGUSR2);
      t.join();
    }
  } join_signals{sig_thread};

  pipeline::PipelineOptions po;
  po.device = o.device;
  po.served_model_name = o.served_model_name;
  po.max_model_len = o.max_model_len;
  po.dummy_weights = o.dummy_weights;
  po.tokenizer_dir = o.tokenizer_dir;
  po.tp = o.tpf.tp;
  po.tp_launch = o.tpf.launch;
  po.engine.max_batch_size = o.max_batch_size;
  po.engine.max_num_tokens = o.max_num_tokens;
  po.engine.kv_cache_tokens = o.kv_cache_tokens;
  po.engine.kv_cache_memory_fraction = o.kv_cache_free_mem_fraction;
  po.engine.block_size = o.block_size;
  po.engine.enable_prefix_caching = !o.no_prefix_cache;
  po.engine.overlap_steps = !o.no_overlap;
  po.warm_up = !o.no_warmup;
  if (from_repo) {
    const server::RepositorySettings& rs = repo.settings;
    if (rs.max_batch_size > 0) po.engine.max_batch_size = rs.max_batch_size;
    if (rs.max_tokens_in_paged_kv_cache > 0) {
      po.engine.kv_cache_tokens = rs.max_tokens_in_paged_kv_cache;
    }
    po.engine.kv_cache_memory_fraction = rs.kv_cache_free_gpu_mem_fraction;
    po.engine.mode = rs.inflight_batching ? BatchingMode::kInflight : BatchingMode::kStaticV1;
    po.engine.policy = rs.guaranteed_no_evict ? CapacityPolicy::kGuaranteedNoEvict
                                              : CapacityPolicy::kMaxUtilization;
    po.engine.enable_prefix_caching = rs.enable_kv_cache_reuse && !o.no_prefix_cache;
    po.engine.enable_chunked_prefill = rs.enable_chunked_context;
  }
  auto start = std::chrono::steady_clock::now();
  Result<std::unique_ptr<pipeline::ModelPipeline>> made =
      pipeline::ModelPipeline::Create(o.model_dir, po);
  if (!made.ok()) throw Error(made.status());
  std::unique_ptr<pipeline::ModelPipeline> pipe = std::move(made).value();
  const pipeline::ModelInfo& info = pipe->info();
  spdlog::info("serve: model '{}' ({}, {:.1f}M parameters) from {} on {}{} in {:.1f} s", info.name,
               info.architecture, info.num_parameters / 1e6, info.model_dir, info.device,
               o.tpf.tp > 1 ? fmt::format(", {} tensor-parallel ranks as {}", o.tpf.tp,
                                          o.tpf.launch.mode == "thread"    ? "threads"
                                          : o.tpf.launch.mode == "process" ? "processes"
                                                                           : "mpirun processes")
                            : std::string(),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  spdlog::info(
      "serve: max model len {}, vocab {}, eos {}, max batch {}, max tokens/step {}, prefix "
      "cache {}",
      info.max_model_len, info.vocab_size, fmt::join(info.eos_token_ids, ","), o.max_batch_size,
      o.max_num_tokens, o.no_prefix_cache ? "off" : "on");
  spdlog::info("serve: KV pool {} blocks x {} tokens = {} tokens", info.kv_blocks, info.block_size,
               static_cast<int64_t>(info.kv_blocks) * info.block_size);

  server::ServerMetrics metrics(info.name);
  server::OpenAiServiceOptions so;
  so.max_active = o.max_batch_size + o.max_queue;
  server::OpenAiService service(pipe.get(), &metrics, so);

  server::HttpServerOptions ho;
  ho.name = "http";
  ho.host = o.host;
  ho.port = static_cast<uint16_t>(o.http_port);
  ho.threads = o.http_threads;
  ho.api_key = o.api_key;
  ho.max_body_bytes = static_cast<size_t>(o.max_body_bytes);
  ho.header_timeout = std::chrono::milliseconds(o.header_timeout_ms);
  ho.access_log = !o.no_access_log;
  server::HttpServer http(ho);
  service.Register(http.router());
  http.SetObserver([&metrics](const server::HttpRequest& req, int status, size_t, double secs) {
    metrics.RecordRequest(EndpointLabel(req.path), status, secs);
  });

  server::HttpServerOptions mo;
  mo.name = "metrics";
  mo.host = o.host;
  mo.port = static_cast<uint16_t>(o.metrics_port);
  mo.threads = 1;
  mo.access_log = false;
  server::HttpServer metrics_http(mo);
  // Triton / KServe v2: the models of the repository, over gRPC (and /v2 on HTTP).
  server::TritonModelsOptions tmo;
  tmo.max_queued_requests =
      repo.settings.max_queue_size > 0 ? 0 : int64_t{po.engine.max_batch_size} + o.max_queue;
  server::TritonModels triton(&pipe->engine(), pipe->tokenizer_ptr(), repo, tmo);

  metrics_http.router().Add(
      "GET", "/metrics",
      [&](server::HttpRequest&, server::ResponderPtr res) {
        std::vector<server::ModelRequestCounts> counts;
        for (const auto& m : repo.models) {
          const server::ModelStats st = triton.stats(m.name);
          counts.push_back({m.name, st.success, st.fail, (st.success_ns + st.fail_ns) / 1000});
        }
        res->Respond(200, "text/plain; version=0.0.4; charset=utf-8",
                     metrics.Render(pipe->stats(), http.counters().connections_open.load(),
                                    service.active() + triton.in_flight(), counts));
      },
      false);
  server::RegisterKserveRoutes(&triton, &http.router());
  server::GrpcServerOptions go;
  go.host = o.host;
  go.port = static_cast<uint16_t>(o.grpc_port);
  server::GrpcServer grpc(&triton, go);

  if (Status s = http.Start(); !s.ok()) {
    throw Error(s.code() == StatusCode::kUnavailable &&
                        s.message().find("in use") != std::string::npos
                    ? Unavailable("port {} is in use (--http-port to choose another)", o.http_port)
                    : s);
  }
  if (Status s = metrics_http.Start(); !s.ok()) {
    throw Error(
        s.message().find("in use") != std::string::npos
            ? Unavailable("port {} is in use (--metrics-port to choose another)", o.metrics_port)
            : s);
  }
  const std::string shown_host = o.host == "0.0.0.0" ? "localhost" : o.host;
  spdlog::info("serve: OpenAI API  http://{}:{}/v1 (chat/completions, completions, models){}",
               shown_host, http.port(), o.api_key.empty() ? "" : " [api key required]");
  spdlog::info("serve: health      http://{}:{}/v2/health/ready", shown_host, http.port());
  spdlog::info("serve: metrics     http://{}:{}/metrics", shown_host, metrics_http.port());
  if (Status s = grpc.Start(); !s.ok()) throw Error(s);
  spdlog::info("serve: KServe v2   grpc://{}:{} and http://{}:{}/v2 (models: {})", shown_host,
               grpc.port(), shown_host, http.port(), [&] {
                 std::vector<std::string> n;
                 for (const auto& m : repo.models) n.push_back(m.name);
                 return fmt::format("{}", fmt::join(n, ", "));
               }());
  std::unique_lock<std::mutex> lock(sig_mu);
  serving = true;
  spdlog::info("serve: ready (Ctrl-C to stop)");
  // Until a signal, or until the backend can run no more steps (a tensor-parallel rank lost):
  // then the server stops with exit status 1, so that a supervisor restarts the whole group.
  Status health;
  while (!sig_cv.wait_for(lock, std::chrono::milliseconds(500), [&] { return signals > 0; })) {
    lock.unlock();
    health = pipe->BackendHealth();
    lock.lock();
    if (!health.ok()) break;
  }
  const int sig = first_signal;
  lock.unlock();
  if (!health.ok()) {
    spdlog::error("serve: the model can no longer run ({}); stopping", health.message());
  } else {
    spdlog::info(
        "serve: {} received: no new requests; finishing {} in flight (up to {} ms; "
        "again to stop at once)",
        sig == SIGINT ? "SIGINT" : "SIGTERM", service.active(), o.shutdown_grace_ms);
  }
  service.SetAccepting(false);
  grpc.SetReady(false);
  http.StopAccepting();
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(o.shutdown_grace_ms);
  while ((service.active() > 0 || triton.in_flight() > 0) &&
         std::chrono::steady_clock::now() < deadline) {
    {
      std::lock_guard<std::mutex> l(sig_mu);
      if (signals > 1) break;  // a second signal: stop now
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (service.active() > 0) {
    spdlog::info("serve: cancelling {} requests still running", service.active());
  }
  pipe->Shutdown();  // aborts the rest; their streams end
  for (int i = 0; i < 40 && service.active() > 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  grpc.Stop();
  http.Stop();
  metrics_http.Stop();
  spdlog::info("serve: stopped");
  return health.ok() ? 0 : 1;
}

RegisterCommand reg(
    "serve", "serve a model over HTTP (OpenAI API, health, metrics)", [](CLI::App& sub) {
      auto o = std::make_shared<ServeOptions>();
      sub.add_option("model_dir", o->model_dir,
                     "Hugging Face model folder (default: the bundled demo)");
      sub.add_option("--host", o->host, "address to listen on")->capture_default_str();
      sub.add_option("--http-port", o->http_port, "HTTP port (OpenAI API, /v2)")
          ->capture_default_str();
      sub.add_option("--grpc-port", o->grpc_port, "gRPC port (KServe v2)")->capture_default_str();
      sub.add_option("--metrics-port", o->metrics_port, "Prometheus metrics port (GET /metrics)")
          ->capture_default_str();
      sub.add_option("--device", o->device, "cpu, cuda, or auto (cuda where a GPU is present)")
          ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
          ->capture_default_str();
      sub.add_flag("--dummy-weights", o->dummy_weights,
                   "random weights from config.json only (speed tests without a checkpoint)");
      AddTpFlags(sub, &o->tpf,
                 "tensor parallelism: shard the model over N ranks (GPUs with --device cuda)");
      sub.add_option(
          "--tokenizer", o->tokenizer_dir,
          "tokenizer folder (default: the model folder, or the repository's tokenizer_dir)");
      sub.add_option("--served-model-name", o->served_model_name,
                     "model id in the API (default: the folder's name)");
      sub.add_option("--api-key", o->api_key,
                     "require 'Authorization: Bearer KEY' (default: open)");
      sub.add_option("--max-batch-size", o->max_batch_size, "sequences running at once")
          ->capture_default_str();
      sub.add_option("--max-num-tokens", o->max_num_tokens,
                     "tokens per engine step (prefill chunks + decodes)")
          ->capture_default_str();
      sub.add_option("--kv-cache-tokens", o->kv_cache_tokens,
                     "KV pool size in tokens (0: a fraction of free memory)")
          ->capture_default_str();
      sub.add_option("--kv-cache-free-mem-fraction", o->kv_cache_free_mem_fraction,
                     "fraction of free memory for the KV pool")
          ->capture_default_str();
      sub.add_option("--block-size", o->block_size, "tokens per KV block")->capture_default_str();
      sub.add_flag("--no-prefix-cache", o->no_prefix_cache,
                   "do not share KV blocks between requests by prefix");
      sub.add_flag("--no-overlap", o->no_overlap,
                   "run engine steps one at a time (by default the host prepares step N+1 while "
                   "the GPU runs step N)");
      sub.add_flag("--no-warmup", o->no_warmup,
                   "start serving without the warm-up steps (on cuda they capture the decode "
                   "graphs and tune the GEMMs before the first request instead of during it)");
      sub.add_option("--max-model-len", o->max_model_len,
                     "prompt + output limit (0: from config.json)")
          ->capture_default_str();
      sub.add_option("--max-queue", o->max_queue,
                     "requests waiting beyond --max-batch-size before 429")
          ->capture_default_str();
      sub.add_option("--http-threads", o->http_threads, "event-loop threads")
          ->capture_default_str();
      sub.add_option("--max-body-bytes", o->max_body_bytes, "request body limit (413 beyond)")
          ->capture_default_str();
      sub.add_option("--header-timeout-ms", o->header_timeout_ms,
                     "a request must arrive within this (408 beyond)")
          ->capture_default_str();
      sub.add_option("--shutdown-grace-ms", o->shutdown_grace_ms,
                     "on SIGTERM, time to finish requests in flight")
          ->capture_default_str();
      sub.add_flag("--no-access-log", o->no_access_log, "no log line per request");
      return [o]() { return RunServe(*o); };
    });

}  // namespace
}  // namespace qilin::cli
