#include "runtime/comm_batch.h"

#include <cstring>
#include <new>
#include <type_traits>

namespace qilin {
namespace {

constexpr char kMagic[4] = {'Q', 'F', 'B', '1'};

template <typename T>
void Put(std::vector<uint8_t>* out, const T& v) {
  static_assert(std::is_trivially_copyable_v<T>);
  const size_t at = out->size();
  out->resize(at + sizeof(T));
  std::memcpy(out->data() + at, &v, sizeof(T));
}

template <typename T>
void PutVector(std::vector<uint8_t>* out, const std::vector<T>& v) {
  Put<uint64_t>(out, v.size());
  const size_t at = out->size();
  out->resize(at + v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(out->data() + at, v.data(), v.size() * sizeof(T));
}

class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : p_(data), left_(size) {}

  template <typename T>
  Status Get(T* v, const char* field) {
    if (left_ < sizeof(T)) {
      return DataLoss("encoded batch: truncated at {} ({} bytes left, need {})", field, left_,
                      sizeof(T));
    }
    std::memcpy(v, p_, sizeof(T));
    p_ += sizeof(T);
    left_ -= sizeof(T);
    return Status::Ok();
  }

  template <typename T>
  Status GetVector(std::vector<T>* v, const char* field) {
    uint64_t n = 0;
    QILIN_RETURN_IF_ERROR(Get(&n, field));
    if (n > left_ / sizeof(T)) {
      return DataLoss("encoded batch: {} claims {} elements of {} bytes, only {} bytes left", field,
                      n, sizeof(T), left_);
    }
    v->resize(n);
    if (n > 0) std::memcpy(v->data(), p_, n * sizeof(T));
    p_ += n * sizeof(T);
    left_ -= n * sizeof(T);
    return Status::Ok();
  }

  size_t left() const { return left_; }
  const uint8_t* pos() const { return p_; }
  void Skip(size_t n) {
    p_ += n;
    left_ -= n;
  }

 private:
  const uint8_t* p_;
  size_t left_;
};

}  // namespace

std::vector<uint8_t> EncodeForwardBatch(const ForwardBatch& b) {
  std::vector<uint8_t> out(kMagic, kMagic + 4);
  Put<int32_t>(&out, b.max_blocks_per_seq);
  PutVector(&out, b.token_ids);
  PutVector(&out, b.positions);
  PutVector(&out, b.slot_mapping);
  PutVector(&out, b.query_start);
  PutVector(&out, b.context_lens);
  PutVector(&out, b.prompt_lens);
  PutVector(&out, b.block_tables);
  PutVector(&out, b.logits_indices);
  return out;
}

Result<ForwardBatch> DecodeForwardBatch(const uint8_t* data, size_t size) {
  if (size < 4 || data == nullptr || std::memcmp(data, kMagic, 4) != 0) {
    return DataLoss("encoded batch: {} bytes without the \"QFB1\" magic", size);
  }
  Reader r(data, size);
  r.Skip(4);
  ForwardBatch b;
  QILIN_RETURN_IF_ERROR(r.Get(&b.max_blocks_per_seq, "max_blocks_per_seq"));
  QILIN_RETURN_IF_ERROR(r.GetVector(&b.token_ids, "token_ids"));
  QILIN_RETURN_IF_ERROR(r.GetVector(&b.positions, "positions"));
  QILIN_RETURN_IF_ERROR(r.GetVector(&b.slot_mapping, "slot_mapping"));
  QILIN_RETURN_IF_ERROR(r.GetVector(&b.query_start, "query_start"));
  QILIN_RETURN_IF_ERROR(r.GetVector(&b.context_lens, "context_lens"));
  QILIN_RETURN_IF_ERROR(r.GetVector(&b.prompt_lens, "prompt_lens"));
  QILIN_RETURN_IF_ERROR(r.GetVector(&b.block_tables, "block_tables"));
  QILIN_RETURN_IF_ERROR(r.GetVector(&b.logits_indices, "logits_indices"));
  if (r.left() != 0) {
    return DataLoss("encoded batch: {} bytes after the last field", r.left());
  }
  return b;
}

Status BroadcastForwardBatch(Communicator& comm, ForwardBatch* batch, int root) {
  std::vector<uint8_t> bytes;
  int64_t size = 0;
  if (comm.rank() == root) {
    bytes = EncodeForwardBatch(*batch);
    size = static_cast<int64_t>(bytes.size());
  }
  QILIN_RETURN_IF_ERROR(comm.Broadcast(&size, sizeof(size), root));
  if (comm.rank() != root) {
    try {
      bytes.resize(size);
    } catch (const std::bad_alloc&) {
      Status st = ResourceExhausted("BroadcastForwardBatch: cannot allocate {} bytes", size);
      comm.Abort(st.message());
      return st;
    }
  }
  QILIN_RETURN_IF_ERROR(comm.Broadcast(bytes.data(), size, root));
  if (comm.rank() == root) return Status::Ok();
  QILIN_ASSIGN_OR_RETURN(*batch, DecodeForwardBatch(bytes.data(), bytes.size()));
  return Status::Ok();
}

}  // namespace qilin
