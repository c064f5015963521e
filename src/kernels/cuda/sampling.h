// Sampling on the device: one block per logits row applies the logits processors (penalties,
// masks), then picks the token as engine/sampler.cc does (greedy argmax, or temperature / top-k /
// top-p / min-p with the same counter-based uniform), and returns the token, its logprob and the
// top-N logprobs. Only these few bytes go back to the host instead of the whole row.
// The CPU reference is engine/sampler.cc (Sampler::Sample); tests/kernels/cuda_sampling_test.cc
// compares the two.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qilin::cuda {

// Candidates a row sorts on the device: top_k up to this; top-p without top-k must find its
// nucleus within the best this many tokens, else the row is handed back to the host.
constexpr int32_t kSampleMaxCandidates = 2048;
constexpr int32_t kSampleMaxLogprobs = 20;

struct SampleRowParams {
  int32_t greedy = 1;  // temperature <= 0 or top_k == 1
  float temperature = 1.0f;
  int32_t top_k = 0;  // 0 or >= vocab: off; else at most kSampleMaxCandidates
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int32_t logprobs = -1;  // -1 none, 0 the chosen token's, N <= kSampleMaxLogprobs also top N
  int32_t entry_begin = 0, entry_count = 0;    // this row's SampleEntry range
  uint64_t seed = 0, stream = 0, counter = 0;  // UniformAt(seed, stream, counter)
};

// A distinct token the row's processors change.
struct SampleEntry {
  int32_t token = 0;
  int32_t out_count = 0;  // occurrences among the generated tokens (presence/frequency)
  int32_t flags = 0;      // kSampleInSequence | kSampleMasked
  int32_t pad = 0;
};
constexpr int32_t kSampleInSequence = 1;  // in prompt + generated (repetition penalty)
constexpr int32_t kSampleMasked = 2;      // banned this step

constexpr int32_t kSampleOk = 0;
constexpr int32_t kSampleNeedsHost = 1;  // row left as it came (raw logits) for the host sampler

struct SampleRowOut {
  int32_t token = -1;
  float logprob = 0.0f;
  int32_t status = kSampleOk;
  int32_t num_top = 0;
  int32_t top_id[kSampleMaxLogprobs];
  float top_logprob[kSampleMaxLogprobs];
};

// Samples `rows` rows of `logits` [rows, vocab] (overwritten by the processors, restored for rows
// handed back). `saved` holds [total entries] floats of scratch. Reads each row 1 (greedy) to
// about 8 times (top-k/top-p candidate selection); writes sizeof(SampleRowOut) per row, and
// with `ids` (may be null) each row's token again into ids[row] (-1 for a row handed back), the
// ids a next step's EmbeddingGather reads as `previous`.
cudaError_t SampleRows(float* logits, int32_t vocab, int32_t rows, const SampleRowParams* params,
                       const SampleEntry* entries, float* saved, SampleRowOut* out,
                       cudaStream_t stream, int32_t* ids = nullptr);

}  // namespace qilin::cuda
