#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A POSIX error number, with the name of the call that produced it.
public struct Errno: Error, Equatable, Sendable, CustomStringConvertible {
    public var code: Int32
    public init(_ code: Int32) { self.code = code }

    /// The current thread's `errno`.
    public static var current: Errno { Errno(errno) }

    public static let io = Errno(EIO)
    public static let invalid = Errno(EINVAL)
    public static let noSpace = Errno(ENOSPC)
    public static let permission = Errno(EPERM)
    public static let notSupported = Errno(EOPNOTSUPP)
    public static let noMemory = Errno(ENOMEM)
    public static let interrupted = Errno(EINTR)
    public static let wouldBlock = Errno(EAGAIN)
    public static let connectionReset = Errno(ECONNRESET)
    public static let brokenPipe = Errno(EPIPE)

    public var description: String { String(cString: strerror(code)) }
}

/// Runs a libc call, retrying on EINTR, and turns -1 into a thrown `Errno`.
@inline(__always)
func retryingEINTR<T: FixedWidthInteger>(_ call: () -> T) throws(Errno) -> T {
    while true {
        let result = call()
        if result != -1 { return result }
        let error = errno
        if error == EINTR { continue }
        // EBADF and EFAULT mean a bug in this program, never the peer's fault.
        precondition(error != EBADF && error != EFAULT, "libc call failed with \(Errno(error))")
        throw Errno(error)
    }
}
