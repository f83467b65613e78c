// Density and structure targets of uint8 RGB images (pure C++, no Python): see targets.cpp for the math.
#pragma once

#include <cstdint>
#include <vector>

namespace uno {

enum class TargetKind { kDensity, kStructure };

// images: n_images contiguous H x W x 3 uint8 images; out: n_images x (gh * gw) floats (row-major cells).
// Requires 1 <= gh <= H, 1 <= gw <= W (checked by the caller). num_threads <= 0: OpenMP's default.
void patch_targets(const uint8_t* images, int64_t n_images, int64_t H, int64_t W, int64_t gh, int64_t gw,
                   TargetKind kind, int num_threads, float* out);

// Caption packing: token lists -> (B, L) ids, attention mask, labels (row-major int64).
// L = max_len if max_len >= 0 (longer lists are truncated) else the longest list.
struct PackedCaptions {
  int64_t batch = 0, length = 0;
  std::vector<int64_t> ids, attention_mask, labels;
};
PackedCaptions pack_captions(const std::vector<std::vector<int64_t>>& tokens,
                             const std::vector<int64_t>& prompt_lens, int64_t pad_id, int64_t ignore_index,
                             int64_t max_len);

}  // namespace uno
