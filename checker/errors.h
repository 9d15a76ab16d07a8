// The one exception type for rejected input.
#pragma once

#include <stdexcept>
#include <string>

namespace sinkcheck {

// Everything wrong with what the user gave us (files, headers, configs, probes) is a CheckError.
// The Python face turns it into one line on stderr and exit code 2, so messages must be complete
// sentences that name the file or tensor at fault.
class CheckError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace sinkcheck
