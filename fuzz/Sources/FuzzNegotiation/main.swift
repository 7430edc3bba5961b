import FuzzSupport

runFuzzer { data, size in fuzzNegotiation(data, size) }
