import FuzzSupport

runFuzzer { data, size in fuzzDecompression(data, size) }
