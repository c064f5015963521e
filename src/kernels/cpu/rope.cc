#include "kernels/cpu/rope.h"

#include <algorithm>
#include <cmath>

namespace qilin::cpu {
namespace {

// 1 / base^(2i / dim) in f32, as torch computes base ** (arange(0, dim, 2).float() / dim).
std::vector<float> BaseInvFreq(double base, int64_t dim) {
  std::vector<float> inv(dim / 2);
  const float fbase = static_cast<float>(base);
  for (int64_t i = 0; i < dim / 2; ++i) {
    const float e = static_cast<float>(2 * i) / static_cast<float>(dim);
    inv[i] = 1.0f / std::pow(fbase, e);
  }
  return inv;
}

int64_t OriginalMax(const ModelConfig& config) {
  return config.rope_scaling.original_max_position_embeddings > 0
             ? config.rope_scaling.original_max_position_embeddings
             : config.max_position_embeddings;
}

}  // namespace

bool RopeDependsOnSeqLen(const ModelConfig& config) {
  return config.rope_scaling.type == RopeScalingType::kDynamic;
}

RopeFreqs ComputeRopeFreqs(const ModelConfig& config, int64_t seq_len, double ntk_alpha) {
  const int64_t dim = config.head_dim;
  const RopeScaling& rs = config.rope_scaling;
  double base = config.rope_theta;
  if (ntk_alpha != 1.0) {
    base = base * std::pow(ntk_alpha, static_cast<double>(dim) / static_cast<double>(dim - 2));
  }
  RopeFreqs out;
  switch (rs.type) {
    case RopeScalingType::kNone:
      out.inv_freq = BaseInvFreq(base, dim);
      break;
    case RopeScalingType::kLinear:
      out.inv_freq = BaseInvFreq(base, dim);
      for (float& f : out.inv_freq) f = static_cast<float>(f / rs.factor);
      break;
    case RopeScalingType::kDynamic: {
      const int64_t max_pos = OriginalMax(config);
      const double len = static_cast<double>(std::max(seq_len, max_pos));
      base = base * std::pow(rs.factor * len / static_cast<double>(max_pos) - (rs.factor - 1.0),
                             static_cast<double>(dim) / static_cast<double>(dim - 2));
      out.inv_freq = BaseInvFreq(base, dim);
      break;
    }
    case RopeScalingType::kYarn: {
      const double factor = rs.factor;
      const double max_pos = static_cast<double>(OriginalMax(config));
      if (rs.attention_factor > 0.0) {
        out.attention_scaling = static_cast<float>(rs.attention_factor);
      } else {
        out.attention_scaling =
            factor <= 1.0 ? 1.0f : static_cast<float>(0.1 * std::log(factor) + 1.0);
      }
      auto correction_dim = [&](double rotations) {
        return (static_cast<double>(dim) * std::log(max_pos / (rotations * 2.0 * M_PI))) /
               (2.0 * std::log(base));
      };
      double low = std::floor(correction_dim(rs.beta_fast));
      double high = std::ceil(correction_dim(rs.beta_slow));
      low = std::max(low, 0.0);
      high = std::min(high, static_cast<double>(dim - 1));
      if (low == high) high += 0.001;
      const float flow = static_cast<float>(low), fhigh = static_cast<float>(high);
      const float fbase = static_cast<float>(base);
      out.inv_freq.resize(dim / 2);
      for (int64_t i = 0; i < dim / 2; ++i) {
        const float pos_freq = std::pow(fbase, static_cast<float>(2 * i) / static_cast<float>(dim));
        const float extrapolation = 1.0f / pos_freq;
        const float interpolation = 1.0f / (static_cast<float>(factor) * pos_freq);
        const float ramp = std::clamp((static_cast<float>(i) - flow) / (fhigh - flow), 0.0f, 1.0f);
        const float extrapolation_factor = 1.0f - ramp;
        out.inv_freq[i] =
            interpolation * (1.0f - extrapolation_factor) + extrapolation * extrapolation_factor;
      }
      break;
    }
  }
  return out;
}

void RopeCosSin(const RopeFreqs& freqs, int64_t pos, float* cos, float* sin) {
  const float p = static_cast<float>(pos);
  for (size_t i = 0; i < freqs.inv_freq.size(); ++i) {
    const float angle = p * freqs.inv_freq[i];
    cos[i] = static_cast<float>(std::cos(static_cast<double>(angle))) * freqs.attention_scaling;
    sin[i] = static_cast<float>(std::sin(static_cast<double>(angle))) * freqs.attention_scaling;
  }
}

void ApplyRope(float* x, int64_t heads, int64_t head_dim, const float* cos, const float* sin) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* xh = x + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const float a = xh[i], b = xh[i + half];
      xh[i] = a * cos[i] - b * sin[i];
      xh[i + half] = b * cos[i + 0] + a * sin[i];
    }
  }
}

}  // namespace qilin::cpu
