// What crosses the engine boundary: a Request (prompt ids + sampling and stop parameters) in,
// a stream of Responses (new token ids, logprobs, text deltas, finish reason) out.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"

namespace qilin {

struct SamplingParams {
  // 0 (or top_k == 1) means greedy. Applied after the penalties, before top-k/top-p/min-p.
  float temperature = 1.0f;
  int32_t top_k = 0;                // 0: off
  float top_p = 1.0f;               // 1: off; keep the smallest set whose probability reaches top_p
  float min_p = 0.0f;               // 0: off; drop tokens with p < min_p * p_max
  float repetition_penalty = 1.0f;  // 1: off; HF/CTRL rule over prompt + generated tokens
  float presence_penalty = 0.0f;    // OpenAI rule over generated tokens
  float frequency_penalty = 0.0f;   // OpenAI rule over generated tokens
  int32_t min_tokens = 0;           // eos and stop token ids are masked until this many
  int32_t max_tokens = 16;          // generated tokens, the finishing eos/stop token included
  std::optional<uint64_t> seed;     // same seed -> same output whatever else is in the batch
  // -1: none; 0: the chosen token's logprob; N > 0: also the N most likely tokens.
  int32_t logprobs = -1;
  int32_t n = 1;  // independent samples sharing the prompt's KV blocks
  // Beam search (TensorRT-LLM's parameters): beam_width > 1 returns the beam_width best
  // hypotheses, ranked by cumulative logprob / length^length_penalty. Streams only at the end.
  int32_t beam_width = 1;
  float length_penalty = 1.0f;
  // Stop conditions besides the engine's eos ids and max_tokens / model length.
  bool ignore_eos = false;
  std::vector<int32_t> stop_token_ids;  // finish "stop" when sampled (token kept in output)
  // Stop strings: checked on the detokenized text when the engine has a detokenizer attached;
  // without one they are refused at submit.
  std::vector<std::string> stop;
  // Detokenized text leaves out special tokens (read by a RequestDetokenizerFactory).
  bool skip_special_tokens = true;
  // Banned token sequences: the last token of a sequence is masked whenever the sequence's
  // tail (prompt + generated) equals the other tokens. Single-token entries are always banned.
  std::vector<std::vector<int32_t>> bad_words;

  bool greedy() const { return temperature <= 0.0f || top_k == 1; }
};

struct Request {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  // Higher runs first; equal priorities are first come, first served.
  int32_t priority = 0;
};

enum class FinishReason { kNone = 0, kStop, kLength, kAbort };
const char* FinishReasonName(FinishReason reason);  // "", "stop", "length", "abort"

struct TokenLogprob {
  int32_t token = -1;
  float logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> top;  // the N most likely (token, logprob), best first
};

struct Response {
  int64_t request_id = -1;
  int32_t seq_index = 0;               // which of the n samples / beams
  std::vector<int32_t> token_ids;      // new since the previous response (beams: all, at the end)
  std::vector<TokenLogprob> logprobs;  // one per token in token_ids when requested
  std::string text;                    // text delta, when a detokenizer is attached
  FinishReason finish_reason = FinishReason::kNone;
  float cumulative_logprob = 0.0f;  // beams: the hypothesis' sum of token logprobs
  Status error;                     // set when the engine failed the request (finish: abort)

  bool finished() const { return finish_reason != FinishReason::kNone; }
};

}  // namespace qilin
