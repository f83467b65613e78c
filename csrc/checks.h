// Input checks for the uno_engine._C bindings, as macros: each throws the Python exception a user expects
// (TypeError for a wrong type or dtype, ValueError for a wrong value or shape) with a message that names the
// argument. Used before the GIL is released, never inside the compute loops.
#pragma once

#include <pybind11/pybind11.h>

#include <sstream>
#include <string>

namespace uno {

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace uno

// UNO_CHECK_TYPE(cond, "image", " must be uint8, got ", name): TypeError "image must be uint8, got ..."
#define UNO_CHECK_TYPE(cond, ...)                                  \
  do {                                                             \
    if (!(cond)) throw pybind11::type_error(::uno::cat(__VA_ARGS__)); \
  } while (0)

// UNO_CHECK_VALUE(cond, ...): ValueError with the concatenated message.
#define UNO_CHECK_VALUE(cond, ...)                                  \
  do {                                                              \
    if (!(cond)) throw pybind11::value_error(::uno::cat(__VA_ARGS__)); \
  } while (0)
