// Tokenizer encode throughput (MB/s of UTF-8 input) on a mixed English / Chinese / code corpus,
// single-threaded (one Encode call over the whole corpus, as tiktoken's figure is taken) and on
// all cores (EncodeBatch over ~4 KB chunks). Decode throughput too.
//   qilin_bench_tokenizer [--tokenizer DIR] [--corpus FILE | --corpus-out FILE] [--json]
// The corpus (same recipe as tools/tokenizer/bench_reference.py): the golden texts, then every
// src/**/*.h and *.cc file sorted by path, then the tokenizer data README, each followed by "\n",
// repeated until it reaches 4.5 MB.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tokenizer/tokenizer.h"

namespace fs = std::filesystem;
using qilin::tokenizer::TokenId;
using qilin::tokenizer::Tokenizer;

// The source tree: the bench binary lives in <source>/build/<preset>/; else the current folder.
static fs::path SourceDir() {
  std::error_code ec;
  fs::path exe = fs::canonical("/proc/self/exe", ec);
  if (!ec) {
    fs::path root = exe.parent_path().parent_path().parent_path();
    if (fs::exists(root / "src" / "tokenizer", ec)) return root;
  }
  return fs::current_path();
}

static std::string ReadFile(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

static std::string BuildCorpus(const fs::path& source_dir, const fs::path& data_dir) {
  std::string unit;
  std::ifstream golden(data_dir / "qwen-golden.jsonl");
  std::string line;
  while (std::getline(golden, line)) {
    if (line.empty()) continue;
    unit += nlohmann::json::parse(line)["text"].get<std::string>() + "\n";
  }
  std::vector<fs::path> files;
  for (const auto& e : fs::recursive_directory_iterator(source_dir / "src")) {
    auto ext = e.path().extension();
    if (e.is_regular_file() && (ext == ".h" || ext == ".cc")) files.push_back(e.path());
  }
  std::sort(files.begin(), files.end(), [&](const fs::path& a, const fs::path& b) {
    return fs::relative(a, source_dir).generic_string() <
           fs::relative(b, source_dir).generic_string();
  });
  for (const auto& f : files) unit += ReadFile(f) + "\n";
  unit += ReadFile(data_dir / "README.md") + "\n";
  std::string corpus;
  const size_t target = 4'500'000;
  while (corpus.size() < target) corpus += unit;
  return corpus;
}

static double ThreadCpuSeconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_nsec) * 1e-9;
}

template <typename F>
static double MedianSeconds(int runs, F&& f) {
  std::vector<double> t;
  for (int i = 0; i < runs; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main(int argc, char** argv) {
  const fs::path source_dir = SourceDir();
  std::string dir = (source_dir / ".." / "shared" / "data" / "tokenizer").string();
  std::string corpus_out, corpus_in;
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--tokenizer" && i + 1 < argc)
      dir = argv[++i];
    else if (a == "--corpus-out" && i + 1 < argc)
      corpus_out = argv[++i];
    else if (a == "--corpus" && i + 1 < argc)
      corpus_in = argv[++i];
    else if (a == "--json")
      json = true;
    else {
      std::fprintf(stderr,
                   "usage: %s [--tokenizer DIR] [--corpus FILE | --corpus-out FILE] [--json]\n",
                   argv[0]);
      return 2;
    }
  }
  auto t0 = std::chrono::steady_clock::now();
  auto loaded = Tokenizer::Load(dir);
  if (!loaded.ok()) {
    std::fprintf(stderr, "error: %s\n", loaded.status().ToString().c_str());
    return 1;
  }
  double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const auto& tok = *loaded;
  std::string corpus;
  if (!corpus_in.empty()) {  // the same bytes as bench_reference.py --corpus reads
    std::ifstream in(corpus_in, std::ios::binary);
    if (!in) {
      std::fprintf(stderr, "error: cannot read --corpus %s\n", corpus_in.c_str());
      return 1;
    }
    corpus.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  } else {
    corpus = BuildCorpus(source_dir, dir);
  }
  if (!corpus_out.empty()) {
    std::ofstream(corpus_out, std::ios::binary) << corpus;
  }
  const double mb = static_cast<double>(corpus.size()) / 1e6;

  std::vector<TokenId> ids;
  auto once = [&] { ids = tok->Encode(corpus).value(); };
  once();  // warm-up (fills the piece cache, as any long-running server's would be)
  double single_s = MedianSeconds(3, once);
  // CPU time of this thread: the figure that does not depend on other load on the machine.
  double cpu_s;
  {
    std::vector<double> t;
    for (int i = 0; i < 3; ++i) {
      double c0 = ThreadCpuSeconds();
      once();
      t.push_back(ThreadCpuSeconds() - c0);
    }
    std::sort(t.begin(), t.end());
    cpu_s = t[1];
  }

  // Chunks of ~4 KB cut at newlines, for the batch (multi-core) figure.
  std::vector<std::string> chunks;
  for (size_t pos = 0; pos < corpus.size();) {
    size_t end = std::min(corpus.size(), pos + 4096);
    size_t nl = corpus.find('\n', end);
    end = nl == std::string::npos ? corpus.size() : nl + 1;
    chunks.push_back(corpus.substr(pos, end - pos));
    pos = end;
  }
  const int threads = omp_get_max_threads();
  tok->EncodeBatch(chunks, true, threads).value();
  double batch_s = MedianSeconds(3, [&] { tok->EncodeBatch(chunks, true, threads).value(); });
  double batch1_s = MedianSeconds(3, [&] { tok->EncodeBatch(chunks, true, 1).value(); });
  double decode_s = MedianSeconds(3, [&] { tok->Decode(ids).value(); });

  if (json) {
    nlohmann::json j = {{"corpus_bytes", corpus.size()},
                        {"tokens", ids.size()},
                        {"load_s", load_s},
                        {"encode_single_call_mb_s", mb / single_s},
                        {"encode_single_call_mb_per_cpu_s", mb / cpu_s},
                        {"encode_batch_1thread_mb_s", mb / batch1_s},
                        {"encode_batch_mb_s", mb / batch_s},
                        {"threads", threads},
                        {"decode_mb_s", mb / decode_s}};
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("tokenizer: %s (load %.2f s)\n", dir.c_str(), load_s);
  std::printf("corpus: %.2f MB, %zu tokens (%.2f bytes/token), %zu chunks\n", mb, ids.size(),
              static_cast<double>(corpus.size()) / static_cast<double>(ids.size()), chunks.size());
  std::printf("%-36s %10s\n", "case", "MB/s");
  std::printf("%-36s %10.2f\n", "encode, one call, 1 thread", mb / single_s);
  std::printf("%-36s %10.2f\n", "  same, MB per CPU-second", mb / cpu_s);
  std::printf("%-36s %10.2f\n", "encode, 4KB chunks, 1 thread", mb / batch1_s);
  std::printf("%-36s %10.2f\n", fmt::format("encode, 4KB chunks, {} threads", threads).c_str(),
              mb / batch_s);
  std::printf("%-36s %10.2f\n", "decode, 1 thread", mb / decode_s);
  return 0;
}
