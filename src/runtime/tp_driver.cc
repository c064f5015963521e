#include "runtime/tp_driver.h"

#include <functional>
#include <new>
#include <string>

#include <fmt/format.h>

#include "runtime/comm_batch.h"
#include "runtime/validate_batch.h"

namespace qilin {

namespace {

struct Command {
  int64_t op = 0;
  int64_t a = 0;
  int64_t b = 0;
  int64_t payload_bytes = 0;
};

// Command limits a follower accepts before allocating (a corrupt or hostile broadcast is an
// error, not a huge allocation).
constexpr int64_t kMaxPayloadBytes = int64_t{1} << 34;

std::vector<uint8_t> EncodePairs(const std::vector<std::pair<int32_t, int32_t>>& src_dst) {
  std::vector<uint8_t> payload(src_dst.size() * 2 * sizeof(int32_t));
  int32_t* p = reinterpret_cast<int32_t*>(payload.data());
  for (size_t i = 0; i < src_dst.size(); ++i) {
    p[2 * i] = src_dst[i].first;
    p[2 * i + 1] = src_dst[i].second;
  }
  return payload;
}

std::vector<std::pair<int32_t, int32_t>> DecodePairs(const std::vector<uint8_t>& payload) {
  const size_t n = payload.size() / (2 * sizeof(int32_t));
  const int32_t* p = reinterpret_cast<const int32_t*>(payload.data());
  std::vector<std::pair<int32_t, int32_t>> pairs(n);
  for (size_t i = 0; i < n; ++i) pairs[i] = {p[2 * i], p[2 * i + 1]};
  return pairs;
}

// This rank's share of one command. `root_batch`: rank 0's own batch (the others decode theirs).
Status Execute(Communicator& comm, TpRankWorker& worker, const Command& cmd,
               const std::vector<uint8_t>& payload, const ForwardBatch* root_batch,
               const std::vector<std::pair<int32_t, int32_t>>* root_pairs,
               std::vector<float>* logits) {
  switch (static_cast<TpOp>(cmd.op)) {
    case TpOp::kAllocateKv:
      return worker.AllocateKv(static_cast<int32_t>(cmd.a), static_cast<int32_t>(cmd.b));
    case TpOp::kCopyKv:
      return worker.CopyKv(root_pairs != nullptr ? *root_pairs : DecodePairs(payload));
    case TpOp::kForward: {
      // Every rank agrees that it has the batch before the step's first collective.
      Result<ForwardBatch> decoded = root_batch != nullptr
                                         ? Result<ForwardBatch>(ForwardBatch{})
                                         : DecodeForwardBatch(payload.data(), payload.size());
      float ok = decoded.ok() ? 1.0f : 0.0f;
      QILIN_RETURN_IF_ERROR(comm.AllReduceSum(&ok, 1));
      if (!decoded.ok()) return decoded.status();
      if (ok != static_cast<float>(comm.world_size())) {
        return Internal("tensor parallel: another rank could not decode the step's batch");
      }
      Status st = worker.Forward(root_batch != nullptr ? *root_batch : *decoded, logits);
      // The other ranks may be waiting in a collective this rank will not reach.
      if (!st.ok()) comm.Abort(st.ToString());
      return st;
    }
    default:
      return Internal("tensor parallel: unknown command {}", cmd.op);
  }
}

}  // namespace

Status TpExchangeStatus(Communicator& comm, const Status& mine) {
  const int n = comm.world_size();
  const float code = static_cast<float>(static_cast<int>(mine.code()));
  std::vector<float> codes(n);
  QILIN_RETURN_IF_ERROR(comm.AllGather(&code, 1, codes.data()));
  for (int r = 0; r < n; ++r) {
    if (codes[r] == 0.0f) continue;
    // The lowest failing rank's message, from that rank.
    std::string msg = r == comm.rank() ? mine.message() : std::string();
    int64_t len = static_cast<int64_t>(msg.size());
    QILIN_RETURN_IF_ERROR(comm.Broadcast(&len, sizeof len, r));
    if (len < 0 || len > (1 << 20)) return Internal("tensor parallel: bad status message size");
    msg.resize(static_cast<size_t>(len));
    QILIN_RETURN_IF_ERROR(comm.Broadcast(msg.data(), len, r));
    return Status(static_cast<StatusCode>(static_cast<int>(codes[r])), msg)
        .WithContext(fmt::format("tensor parallel rank {}", r));
  }
  return Status::Ok();
}

Status TpCheckSameModel(Communicator& comm, const ModelConfig& c) {
  // The fields as exact small numbers: each fits a float's 24-bit mantissa, or is hashed to 20
  // bits where it may not (rope floats).
  const auto h20 = [](double x) {
    return static_cast<float>(std::hash<std::string>{}(fmt::format("{:.17g}", x)) & 0xFFFFF);
  };
  const std::vector<float> mine = {static_cast<float>(static_cast<int>(c.arch)),
                                   static_cast<float>(c.vocab_size),
                                   static_cast<float>(c.hidden_size),
                                   static_cast<float>(c.intermediate_size),
                                   static_cast<float>(c.num_layers),
                                   static_cast<float>(c.num_heads),
                                   static_cast<float>(c.num_kv_heads),
                                   static_cast<float>(c.head_dim),
                                   static_cast<float>(c.MaxModelLen()),
                                   h20(c.rope_theta),
                                   h20(c.rms_norm_eps),
                                   static_cast<float>(c.tie_word_embeddings),
                                   static_cast<float>(c.attention_bias),
                                   static_cast<float>(c.qk_norm)};
  static constexpr const char* kNames[] = {
      "architecture",     "vocab_size", "hidden_size",  "intermediate_size",
      "num_layers",       "num_heads",  "num_kv_heads", "head_dim",
      "max model length", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
      "attention_bias",   "qk_norm"};
  const int n = comm.world_size();
  const int64_t k = static_cast<int64_t>(mine.size());
  std::vector<float> all(static_cast<size_t>(n * k));
  QILIN_RETURN_IF_ERROR(comm.AllGather(mine.data(), k, all.data()));
  for (int r = 1; r < n; ++r) {
    for (int64_t i = 0; i < k; ++i) {
      if (all[r * k + i] != all[i]) {
        return InvalidArgument(
            "tensor parallel rank {} loaded another model than rank 0: its {} differs ({} vs {})",
            r, kNames[i], all[r * k + i], all[i]);
      }
    }
  }
  return Status::Ok();
}

Status TpLead(Communicator& comm, TpRankWorker& worker, TpOp op, int64_t a, int64_t b,
              const ForwardBatch* batch, const std::vector<std::pair<int32_t, int32_t>>* pairs,
              std::vector<float>* logits) {
  std::vector<uint8_t> payload;
  if (comm.world_size() > 1) {
    if (op == TpOp::kForward && batch != nullptr) payload = EncodeForwardBatch(*batch);
    if (op == TpOp::kCopyKv && pairs != nullptr) payload = EncodePairs(*pairs);
  }
  Command cmd{static_cast<int64_t>(op), a, b, static_cast<int64_t>(payload.size())};
  QILIN_RETURN_IF_ERROR(comm.Broadcast(&cmd, sizeof(cmd), 0));
  if (cmd.payload_bytes > 0) {
    QILIN_RETURN_IF_ERROR(comm.Broadcast(payload.data(), cmd.payload_bytes, 0));
  }
  if (op == TpOp::kShutdown) return Status::Ok();
  Status mine;
  try {
    mine = Execute(comm, worker, cmd, payload, batch, pairs, logits);
  } catch (const std::bad_alloc&) {
    comm.Abort("out of host memory in a step");
    return ResourceExhausted("tensor parallel rank 0: out of host memory in a step");
  }
  Status all = TpExchangeStatus(comm, mine);
  // An aborted group cannot exchange statuses: this rank's own error says more than the abort.
  if (!mine.ok() && all.code() == StatusCode::kCancelled) {
    return mine.WithContext("tensor parallel rank 0");
  }
  return all;
}

Status TpLeaderBackend::AllocateKvCache(const KvCacheLayout& layout) {
  if (layout.block_size <= 0 || layout.num_blocks <= 0) {
    return InvalidArgument("KV cache layout: num_blocks = {} and block_size = {} must be positive",
                           layout.num_blocks, layout.block_size);
  }
  layout_ = KvCacheLayout{0, layout.block_size};
  QILIN_RETURN_IF_ERROR(health_.Note(
      TpLead(*lead_comm_, *lead_worker_, TpOp::kAllocateKv, layout.num_blocks, layout.block_size)));
  layout_ = layout;
  return Status::Ok();
}

Status TpLeaderBackend::CopyKvBlocks(const std::vector<std::pair<int32_t, int32_t>>& src_dst) {
  QILIN_RETURN_IF_ERROR(ValidateBlockPairs(src_dst, layout_));
  if (src_dst.empty()) return Status::Ok();
  return health_.Note(TpLead(*lead_comm_, *lead_worker_, TpOp::kCopyKv, 0, 0, nullptr, &src_dst));
}

Status TpLeaderBackend::Forward(const ForwardBatch& batch, std::vector<float>* logits) {
  QILIN_RETURN_IF_ERROR(ValidateForwardBatch(batch, config_, layout_));
  if (logits == nullptr) return InvalidArgument("tensor parallel Forward: no logits vector");
  return health_.Note(
      TpLead(*lead_comm_, *lead_worker_, TpOp::kForward, 0, 0, &batch, nullptr, logits));
}

void TpLeaderBackend::StopFollowers() {
  if ((!threads_.empty() || followers_elsewhere_) && lead_comm_ != nullptr) {
    (void)TpLead(*lead_comm_, *lead_worker_, TpOp::kShutdown);
  }
  for (std::thread& t : threads_) t.join();
  threads_.clear();
  followers_elsewhere_ = false;
}

Status TpFollow(Communicator& comm, TpRankWorker& worker) {
  while (true) {
    Command cmd;
    QILIN_RETURN_IF_ERROR(comm.Broadcast(&cmd, sizeof(cmd), 0));
    if (cmd.payload_bytes < 0 || cmd.payload_bytes > kMaxPayloadBytes) {
      comm.Abort(fmt::format("a command's payload of {} bytes", cmd.payload_bytes));
      return Internal("tensor parallel: a command's payload of {} bytes", cmd.payload_bytes);
    }
    std::vector<uint8_t> payload;
    try {
      payload.resize(static_cast<size_t>(cmd.payload_bytes));
    } catch (const std::bad_alloc&) {
      comm.Abort("cannot allocate a command's payload");
      return ResourceExhausted("tensor parallel rank {}: cannot allocate {} bytes", comm.rank(),
                               cmd.payload_bytes);
    }
    if (cmd.payload_bytes > 0) {
      QILIN_RETURN_IF_ERROR(comm.Broadcast(payload.data(), cmd.payload_bytes, 0));
    }
    if (cmd.op == static_cast<int64_t>(TpOp::kShutdown)) return Status::Ok();
    Status mine;
    try {
      mine = Execute(comm, worker, cmd, payload, nullptr, nullptr, nullptr);
    } catch (const std::bad_alloc&) {
      comm.Abort("out of host memory in a step");
      return ResourceExhausted("tensor parallel rank {}: out of host memory in a step",
                               comm.rank());
    }
    Status all = TpExchangeStatus(comm, mine);
    if (all.code() == StatusCode::kCancelled) return all;  // the group is over
  }
}

}  // namespace qilin
