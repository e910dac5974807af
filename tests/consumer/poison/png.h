// Found before the system's png.h by the consumer's headers check: an installed
// sparsevlm header that includes it stops the build here.
#error "an installed sparsevlm header includes png.h (a tools-only dependency)"
