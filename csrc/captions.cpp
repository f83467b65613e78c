// Caption packing: token-id lists -> right-padded ids, attention mask and labels. Labels equal the ids on
// caption tokens and ignore_index on the prompt (the first prompt_lens[b] tokens) and on padding; they are
// NOT shifted (the critic shifts: the hidden state at p predicts token p + 1).

#include <algorithm>

#include "targets.h"

namespace uno {

PackedCaptions pack_captions(const std::vector<std::vector<int64_t>>& tokens,
                             const std::vector<int64_t>& prompt_lens, int64_t pad_id, int64_t ignore_index,
                             int64_t max_len) {
  PackedCaptions out;
  out.batch = static_cast<int64_t>(tokens.size());
  int64_t longest = 0;
  for (const auto& t : tokens) longest = std::max<int64_t>(longest, static_cast<int64_t>(t.size()));
  out.length = max_len >= 0 ? max_len : longest;
  const size_t n = static_cast<size_t>(out.batch * out.length);
  out.ids.assign(n, pad_id);
  out.attention_mask.assign(n, 0);
  out.labels.assign(n, ignore_index);
  for (int64_t b = 0; b < out.batch; ++b) {
    const auto& t = tokens[static_cast<size_t>(b)];
    const int64_t len = std::min<int64_t>(static_cast<int64_t>(t.size()), out.length);
    const int64_t pl = prompt_lens.empty() ? 0 : prompt_lens[static_cast<size_t>(b)];
    int64_t* ids = out.ids.data() + b * out.length;
    int64_t* am = out.attention_mask.data() + b * out.length;
    int64_t* lab = out.labels.data() + b * out.length;
    for (int64_t p = 0; p < len; ++p) {
      ids[p] = t[static_cast<size_t>(p)];
      am[p] = 1;
      if (p >= pl) lab[p] = ids[p];
    }
  }
  return out;
}

}  // namespace uno
