#include "server/openai_api.h"

#include <map>
#include <set>
#include <sstream>

#include <gtest/gtest.h>

#include "server/metrics.h"

namespace qilin::server {
namespace {

using json = nlohmann::json;

bool Parse(const std::string& body, bool chat, OpenAiRequest* r, ApiError* e) {
  return ParseOpenAiRequest(body, chat, ParseLimits{}, r, e);
}

TEST(OpenAiParse, ChatDefaultsAndFields) {
  OpenAiRequest r;
  ApiError e;
  ASSERT_TRUE(Parse(R"({"model":"demo","messages":[{"role":"system","content":"s"},
      {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
      "temperature":0.5,"top_p":0.9,"n":2,"seed":7,"stop":"\n","logprobs":true,
      "top_logprobs":3,"presence_penalty":0.5,"frequency_penalty":-1,
      "max_completion_tokens":12,"stream":true,"stream_options":{"include_usage":true}})",
                    true, &r, &e))
      << e.message;
  EXPECT_TRUE(r.chat);
  EXPECT_EQ(r.model, "demo");
  ASSERT_EQ(r.inputs.size(), 1u);
  EXPECT_EQ(r.inputs[0].messages[1]["content"], "ab");
  const SamplingParams& s = r.params.sampling;
  EXPECT_FLOAT_EQ(s.temperature, 0.5f);
  EXPECT_FLOAT_EQ(s.top_p, 0.9f);
  EXPECT_EQ(s.n, 2);
  EXPECT_EQ(s.seed, 7u);
  EXPECT_EQ(s.stop, std::vector<std::string>{"\n"});
  EXPECT_EQ(s.logprobs, 3);
  EXPECT_FLOAT_EQ(s.presence_penalty, 0.5f);
  EXPECT_FLOAT_EQ(s.frequency_penalty, -1.0f);
  EXPECT_EQ(s.max_tokens, 12);
  EXPECT_FALSE(r.params.max_tokens_auto);
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
}

TEST(OpenAiParse, ChatWithoutMaxTokensRunsToTheModelLength) {
  OpenAiRequest r;
  ApiError e;
  ASSERT_TRUE(Parse(R"({"messages":[{"role":"user","content":"hi"}]})", true, &r, &e));
  EXPECT_TRUE(r.params.max_tokens_auto);
  EXPECT_EQ(r.params.sampling.logprobs, -1);
}

TEST(OpenAiParse, CompletionPrompts) {
  OpenAiRequest r;
  ApiError e;
  ASSERT_TRUE(Parse(R"({"prompt":"hello","logprobs":2})", false, &r, &e));
  EXPECT_EQ(r.params.sampling.max_tokens, 16);  // OpenAI's default for completions
  EXPECT_EQ(r.params.sampling.logprobs, 2);
  ASSERT_TRUE(Parse(R"({"prompt":[1,2,3]})", false, &r, &e));
  ASSERT_EQ(r.inputs.size(), 1u);
  EXPECT_EQ(r.inputs[0].token_ids, (std::vector<int32_t>{1, 2, 3}));
  ASSERT_TRUE(Parse(R"({"prompt":["a",[5,6]],"stop":["x","y"]})", false, &r, &e));
  ASSERT_EQ(r.inputs.size(), 2u);
  EXPECT_EQ(r.inputs[0].text, "a");
  EXPECT_EQ(r.inputs[1].token_ids, (std::vector<int32_t>{5, 6}));
  EXPECT_EQ(r.params.sampling.stop.size(), 2u);
}

struct BadCase {
  const char* body;
  bool chat;
  const char* param;
  const char* words;  // must appear in the message
};

TEST(OpenAiParse, BadInputNamesTheParameter) {
  const BadCase cases[] = {
      {R"({"messages":[{"role":"user","content":"x"}])", true, "", "not valid JSON"},
      {R"([1,2])", true, "", "JSON object"},
      {R"({"messages":"hi"})", true, "messages", "must be an array"},
      {R"({"messages":[]})", true, "messages", "at least one"},
      {R"({})", true, "messages", "required"},
      {R"({"messages":[{"role":"wizard","content":"x"}]})", true, "messages[0].role", "wizard"},
      {R"({"messages":[{"role":"user","content":5}]})", true, "messages[0].content", "string"},
      {R"({"messages":[{"role":"user","content":"x"}],"max_tokens":-1})", true, "max_tokens",
       "[1, 2147483647]"},
      {R"({"messages":[{"role":"user","content":"x"}],"max_tokens":99999999999})", true,
       "max_tokens", "99999999999"},
      {R"({"messages":[{"role":"user","content":"x"}],"max_tokens":"ten"})", true, "max_tokens",
       "integer"},
      {R"({"messages":[{"role":"user","content":"x"}],"max_tokens":1.5})", true, "max_tokens",
       "integer"},
      {R"({"messages":[{"role":"user","content":"x"}],"temperature":"hot"})", true, "temperature",
       "number"},
      {R"({"messages":[{"role":"user","content":"x"}],"temperature":3})", true, "temperature",
       "[0, 2]"},
      {R"({"messages":[{"role":"user","content":"x"}],"n":0})", true, "n", "[1, 64]"},
      {R"({"messages":[{"role":"user","content":"x"}],"stop":5})", true, "stop", "string"},
      {R"({"messages":[{"role":"user","content":"x"}],"stop":[""]})", true, "stop", "empty"},
      {R"({"messages":[{"role":"user","content":"x"}],"top_logprobs":2})", true, "top_logprobs",
       "logprobs"},
      {R"({"messages":[{"role":"user","content":"x"}],"stream_options":{}})", true,
       "stream_options", "stream"},
      {R"({"messages":[{"role":"user","content":"x"}],"presence_penalty":2.5})", true,
       "presence_penalty", "[-2, 2]"},
      {R"({"prompt":7})", false, "prompt", "must be a string"},
      {R"({"prompt":[-1]})", false, "prompt", "not a token id"},
      {R"({"prompt":"x","logprobs":true})", false, "logprobs", "integer"},
      {R"({"prompt":"x","model":3})", false, "model", "string"},
  };
  for (const auto& c : cases) {
    OpenAiRequest r;
    ApiError e;
    EXPECT_FALSE(Parse(c.body, c.chat, &r, &e)) << c.body;
    EXPECT_EQ(e.status, 400) << c.body;
    EXPECT_EQ(e.param, c.param) << c.body;
    EXPECT_NE(e.message.find(c.words), std::string::npos) << c.body << " -> " << e.message;
  }
}

TEST(OpenAiParse, InvalidUtf8IsRefused) {
  OpenAiRequest r;
  ApiError e;
  std::string body = "{\"prompt\":\"a\xff\xfe b\"}";
  EXPECT_FALSE(Parse(body, false, &r, &e));
  EXPECT_EQ(e.status, 400);
  EXPECT_NE(e.message.find("JSON"), std::string::npos);
}

TEST(OpenAiError, Shape) {
  ApiError e{404, "no such model", "model", "model_not_found"};
  json j = json::parse(e.Body());
  ASSERT_TRUE(j.contains("error"));
  EXPECT_EQ(j["error"]["message"], "no such model");
  EXPECT_EQ(j["error"]["type"], "not_found_error");
  EXPECT_EQ(j["error"]["param"], "model");
  EXPECT_EQ(j["error"]["code"], "model_not_found");
  json k = json::parse(OpenAiErrorBody(429, "busy", ""));
  EXPECT_EQ(k["error"]["type"], "rate_limit_error");
  EXPECT_TRUE(k["error"]["param"].is_null());
  EXPECT_EQ(k["error"]["code"], 429);
  EXPECT_EQ(OpenAiErrorType(400), "invalid_request_error");
  EXPECT_EQ(OpenAiErrorType(500), "server_error");
}

TEST(Sse, Framing) {
  EXPECT_EQ(SseData(json{{"a", 1}}), "data: {\"a\":1}\n\n");
  EXPECT_EQ(SseDone(), "data: [DONE]\n\n");
  // Invalid UTF-8 (a token that is half a character) is replaced, never thrown.
  std::string s = SseData(json{{"t", std::string("\xe4\xbd")}});
  EXPECT_EQ(s.substr(0, 6), "data: ");
  EXPECT_EQ(s.substr(s.size() - 2), "\n\n");
  EXPECT_NE(s.find("\xef\xbf\xbd"), std::string::npos);
  // A newline inside a string stays escaped: one event is one line.
  std::string nl = SseData(json{{"t", "a\nb"}});
  EXPECT_EQ(nl.find('\n'), nl.size() - 2);
}

TEST(Router, ExactPrefixAndMethod) {
  Router r;
  int hit = 0;
  r.Add("GET", "/a", [&](HttpRequest&, ResponderPtr) { hit = 1; });
  r.AddPrefix(
      "POST", "/v2/models/", [&](HttpRequest&, ResponderPtr) { hit = 2; }, false);
  r.AddPrefix("POST", "/v2/models/x/", [&](HttpRequest&, ResponderPtr) { hit = 3; });
  auto m = r.Find("GET", "/a");
  ASSERT_TRUE(m.handler);
  HttpRequest req;
  (*m.handler)(req, nullptr);
  EXPECT_EQ(hit, 1);
  m = r.Find("POST", "/a");
  EXPECT_FALSE(m.handler);
  EXPECT_TRUE(m.path_known);  // 405
  m = r.Find("GET", "/b");
  EXPECT_FALSE(m.handler);
  EXPECT_FALSE(m.path_known);  // 404
  m = r.Find("POST", "/v2/models/x/infer");
  ASSERT_TRUE(m.handler);
  (*m.handler)(req, nullptr);
  EXPECT_EQ(hit, 3);  // longest prefix
  m = r.Find("POST", "/v2/models/y/infer");
  ASSERT_TRUE(m.handler);
  EXPECT_FALSE(m.protect);
}

// Metrics text: parse every sample line back and check the values against what was recorded.
TEST(Metrics, TextFormatAndValues) {
  ServerMetrics m("de\"mo");
  m.RecordRequest("/v1/completions", 200, 0.5);
  m.RecordRequest("/v1/completions", 400, 0.001);
  m.RecordGeneration(10, 5, 0.5, true);
  m.ObserveTimeToFirstToken(0.003);
  m.ObserveTimeToFirstToken(0.2);
  m.RequestRejected();
  EngineStats s;
  s.kv_blocks_total = 100;
  s.kv_blocks_used = 7;
  s.kv_blocks_free = 93;
  s.running = 2;
  s.waiting = 1;
  s.prefix_cache_queries = 4;
  s.prefix_cache_hits = 1;
  const std::string text = m.Render(s, 3, 3);
  std::map<std::string, std::string> samples;
  std::istringstream in(text);
  std::string line;
  std::set<std::string> typed;
  while (std::getline(in, line)) {
    ASSERT_FALSE(line.empty());
    if (line.rfind("# TYPE ", 0) == 0) {
      std::string name = line.substr(7, line.find(' ', 7) - 7);
      EXPECT_TRUE(typed.insert(name).second) << "TYPE twice: " << name;
      continue;
    }
    if (line[0] == '#') continue;
    const size_t sp = line.rfind(' ');
    samples[line.substr(0, sp)] = line.substr(sp + 1);
  }
  EXPECT_EQ(samples["nv_inference_request_success{model=\"de\\\"mo\",version=\"1\"}"], "1");
  EXPECT_EQ(samples["nv_inference_request_failure{model=\"de\\\"mo\",version=\"1\",reason="
                    "\"REJECTED\"}"],
            "1");
  EXPECT_EQ(samples["qilin_requests_total{endpoint=\"/v1/completions\",status=\"400\"}"], "1");
  EXPECT_EQ(samples["qilin_kv_cache_blocks_used{model_name=\"de\\\"mo\"}"], "7");
  EXPECT_EQ(samples["qilin_kv_cache_blocks_free{model_name=\"de\\\"mo\"}"], "93");
  EXPECT_EQ(samples["qilin_prefix_cache_hit_rate{model_name=\"de\\\"mo\"}"], "0.25");
  EXPECT_EQ(samples["qilin_prompt_tokens_total{model_name=\"de\\\"mo\"}"], "10");
  EXPECT_EQ(samples["qilin_generation_tokens_total{model_name=\"de\\\"mo\"}"], "5");
  // Histogram buckets are cumulative: 0.003 falls in le=0.005, 0.2 in le=0.25.
  const std::string h = "qilin_time_to_first_token_seconds_bucket{model_name=\"de\\\"mo\",le=";
  EXPECT_EQ(samples[h + "\"0.0025\"}"], "0");
  EXPECT_EQ(samples[h + "\"0.005\"}"], "1");
  EXPECT_EQ(samples[h + "\"0.1\"}"], "1");
  EXPECT_EQ(samples[h + "\"0.25\"}"], "2");
  EXPECT_EQ(samples[h + "\"+Inf\"}"], "2");
  EXPECT_EQ(samples["qilin_time_to_first_token_seconds_count{model_name=\"de\\\"mo\"}"], "2");
  EXPECT_DOUBLE_EQ(
      std::stod(samples["qilin_time_to_first_token_seconds_sum{model_name=\"de\\\"mo\"}"]), 0.203);
}

}  // namespace
}  // namespace qilin::server
