#include <stddef.h>
#include <stdint.h>

// libFuzzer's entry for programs that have their own main (libFuzzer's
// FuzzerInterface.h). SwiftPM gives every executable its own main, so the
// targets call this instead of linking libFuzzer's main.
int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*callback)(const uint8_t *data, size_t size));
