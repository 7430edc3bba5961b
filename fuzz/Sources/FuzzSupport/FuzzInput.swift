#if canImport(Glibc)
import Glibc
#endif
import CFuzzerDriver

/// Draws values from the fuzzer's bytes. Past the end it yields zeros, so
/// every input is a complete program and the fuzzer never wastes a run on
/// "too short".
public struct FuzzInput {
    public let bytes: UnsafeRawBufferPointer
    public private(set) var position = 0

    public init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    public init(_ data: UnsafePointer<UInt8>?, _ size: Int) {
        bytes = size > 0 ? UnsafeRawBufferPointer(start: data, count: size) : UnsafeRawBufferPointer(start: nil, count: 0)
    }

    public var remaining: Int { bytes.count - position }

    /// The next big-endian `T`, zero-padded at the end of the input.
    public mutating func next<T: FixedWidthInteger>(_: T.Type = T.self) -> T {
        var value: T = 0
        for _ in 0..<MemoryLayout<T>.size {
            value = value << 8 | T(truncatingIfNeeded: position < bytes.count ? bytes[position] : 0)
            position += 1
        }
        return value
    }

    public mutating func nextBool() -> Bool { next(UInt8.self) & 1 != 0 }

    /// Up to `count` bytes (fewer at the end of the input).
    public mutating func take(_ count: Int) -> UnsafeRawBufferPointer {
        let start = min(position, bytes.count), n = max(0, min(count, bytes.count - start))
        position = start + n
        return UnsafeRawBufferPointer(rebasing: bytes[start..<start + n])
    }

    /// Everything not yet consumed.
    public mutating func rest() -> UnsafeRawBufferPointer { take(remaining) }
}

/// Stops the run with a message libFuzzer records next to the reproducer.
/// A plain crash (not `assert`) so the check also holds in release builds.
public func fuzzCheck(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String,
                      file: StaticString = #fileID, line: UInt = #line) {
    if !condition() { fatalError("fuzz check failed: \(message())", file: file, line: line) }
}

/// Hands the process to libFuzzer, which parses the command line and calls
/// `body` once per input. Each target's main.swift is this one call.
public func runFuzzer(_ body: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> Never {
    var argc = CommandLine.argc
    var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
    exit(LLVMFuzzerRunDriver(&argc, &argv, body))
}
