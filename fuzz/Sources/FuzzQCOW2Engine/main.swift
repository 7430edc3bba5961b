import FuzzSupport

runFuzzer { data, size in fuzzQCOW2Engine(data, size) }
