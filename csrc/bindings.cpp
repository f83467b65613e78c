// The one bindings file of uno_engine._C: numpy in, numpy out, inputs checked (checks.h), GIL released
// around the compute, OpenMP threads inside. The compute lives in targets.cpp / captions.cpp (no Python).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "targets.h"

namespace py = pybind11;

namespace {

std::pair<int64_t, int64_t> parse_grid(const py::object& grid) {
  if (py::isinstance<py::int_>(grid)) {
    const auto g = grid.cast<int64_t>();
    return {g, g};
  }
  UNO_CHECK_TYPE(py::isinstance<py::sequence>(grid) && !py::isinstance<py::str>(grid),
                 "grid must be an int or a (gh, gw) pair of ints, got ", std::string(py::str(grid.get_type())));
  auto seq = grid.cast<py::sequence>();
  UNO_CHECK_VALUE(seq.size() == 2, "grid must be an int or a (gh, gw) pair, got ", seq.size(), " values");
  UNO_CHECK_TYPE(py::isinstance<py::int_>(seq[0]) && py::isinstance<py::int_>(seq[1]),
                 "grid must be an int or a (gh, gw) pair of ints");
  return {seq[0].cast<int64_t>(), seq[1].cast<int64_t>()};
}

py::array_t<float> patch_targets(const py::array& image, const py::object& grid, int num_threads,
                                 uno::TargetKind kind) {
  UNO_CHECK_TYPE(image.dtype().is(py::dtype::of<uint8_t>()), "image must be a uint8 array of shape (H, W, 3) or ",
                 "(B, H, W, 3), got dtype ", std::string(py::str(image.dtype())),
                 " (float images go through the torch version, uno_engine.targets.*_targets(tensor, grid))");
  UNO_CHECK_VALUE(image.ndim() == 3 || image.ndim() == 4,
                  "image must have shape (H, W, 3) or (B, H, W, 3) (HWC), got ", image.ndim(), " dims");
  UNO_CHECK_VALUE(image.shape(image.ndim() - 1) == 3, "image must be RGB in HWC layout: last dim 3, got ",
                  image.shape(image.ndim() - 1));
  const bool batched = image.ndim() == 4;
  const int64_t n = batched ? image.shape(0) : 1;
  const int64_t H = image.shape(image.ndim() - 3), W = image.shape(image.ndim() - 2);
  const auto [gh, gw] = parse_grid(grid);
  UNO_CHECK_VALUE(gh >= 1 && gw >= 1, "grid must be positive, got (", gh, ", ", gw, ")");
  UNO_CHECK_VALUE(gh <= H && gw <= W, "grid (", gh, ", ", gw, ") is larger than the image (H, W) = (", H, ", ",
                  W, "): every patch cell needs at least one pixel");
  auto img = py::array_t<uint8_t, py::array::c_style>::ensure(image);  // a contiguous copy if strided
  UNO_CHECK_VALUE(img, "image could not be made contiguous");
  std::vector<py::ssize_t> shape = batched ? std::vector<py::ssize_t>{n, gh * gw} : std::vector<py::ssize_t>{gh * gw};
  py::array_t<float> out(shape);
  const uint8_t* src = img.data();
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    uno::patch_targets(src, n, H, W, gh, gw, kind, num_threads, dst);
  }
  return out;
}

py::tuple pack_captions(const py::object& token_lists, const py::object& prompt_lens, int64_t pad_id,
                        int64_t ignore_index, const py::object& max_len) {
  std::vector<std::vector<int64_t>> tokens;
  try {
    tokens = token_lists.cast<std::vector<std::vector<int64_t>>>();
  } catch (const py::cast_error&) {
    throw py::type_error("token_lists must be a sequence of sequences of ints (token ids)");
  }
  const auto B = static_cast<int64_t>(tokens.size());
  std::vector<int64_t> pl;
  if (!prompt_lens.is_none()) {
    try {
      pl = prompt_lens.cast<std::vector<int64_t>>();
    } catch (const py::cast_error&) {
      throw py::type_error("prompt_lens must be None or a sequence of ints");
    }
    UNO_CHECK_VALUE(static_cast<int64_t>(pl.size()) == B, "prompt_lens has ", pl.size(),
                    " entries but token_lists has ", B);
    for (int64_t b = 0; b < B; ++b) {
      UNO_CHECK_VALUE(pl[b] >= 0 && pl[b] <= static_cast<int64_t>(tokens[b].size()), "prompt_lens[", b, "] = ",
                      pl[b], " must be in [0, len(token_lists[", b, "])] = [0, ", tokens[b].size(), "]");
    }
  }
  int64_t L = -1;
  if (!max_len.is_none()) {
    UNO_CHECK_TYPE(py::isinstance<py::int_>(max_len), "max_len must be None or an int");
    L = max_len.cast<int64_t>();
    UNO_CHECK_VALUE(L >= 0, "max_len must be >= 0, got ", L);
  }
  uno::PackedCaptions packed;
  {
    py::gil_scoped_release release;
    packed = uno::pack_captions(tokens, pl, pad_id, ignore_index, L);
  }
  auto to_array = [&](const std::vector<int64_t>& v) {
    py::array_t<int64_t> a({packed.batch, packed.length});
    if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(int64_t));
    return a;
  };
  return py::make_tuple(to_array(packed.ids), to_array(packed.attention_mask), to_array(packed.labels));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "uno_engine's C++ data-side ops (density/structure targets, caption packing); see uno_engine.targets";
  m.def(
      "density_targets",
      [](const py::array& image, const py::object& grid, int num_threads) {
        return patch_targets(image, grid, num_threads, uno::TargetKind::kDensity);
      },
      py::arg("image"), py::arg("grid"), py::arg("num_threads") = 0,
      "Per-cell mean forward-difference gradient energy of the luminance of a uint8 (H, W, 3) or (B, H, W, 3) "
      "image -> float32 (gh*gw,) or (B, gh*gw). num_threads <= 0: OpenMP default.");
  m.def(
      "structure_targets",
      [](const py::array& image, const py::object& grid, int num_threads) {
        return patch_targets(image, grid, num_threads, uno::TargetKind::kStructure);
      },
      py::arg("image"), py::arg("grid"), py::arg("num_threads") = 0,
      "Per-cell mean Sobel magnitude (Sobel / 8) of the luminance; same shapes as density_targets.");
  m.def("pack_captions", &pack_captions, py::arg("token_lists"), py::arg("prompt_lens") = py::none(),
        py::arg("pad_id") = 0, py::arg("ignore_index") = -100, py::arg("max_len") = py::none(),
        "Token-id lists -> (ids, attention_mask, labels), int64 (B, L) numpy arrays, right padded; labels are "
        "ignore_index on the prompt and on padding.");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
