import FuzzSupport

runFuzzer { data, size in fuzzQCOW2Metadata(data, size) }
