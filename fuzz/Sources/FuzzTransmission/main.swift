import FuzzSupport

runFuzzer { data, size in fuzzTransmission(data, size) }
