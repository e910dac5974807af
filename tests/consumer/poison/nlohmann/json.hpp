// Found before the system's nlohmann/json.hpp by the consumer's headers check: an
// installed sparsevlm header that includes it stops the build here.
#error "an installed sparsevlm header includes nlohmann/json.hpp (a tools-only dependency)"
