import SystemIO

/// Why a device operation failed. Only the server's edge turns this into
/// an NBD error code; the `reason` goes to the log and to structured error
/// chunks.
public struct DeviceError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// Input/output failure, including metadata found broken while serving.
        case io
        /// The export does not accept writes.
        case readOnly
        /// No room left (write past the end, or the host is full).
        case noSpace
        /// The request makes no sense for this device.
        case invalid
        /// The device cannot do this (e.g. a fast zero it can't make fast).
        case notSupported
        /// Out of memory.
        case noMemory
    }
    public var kind: Kind
    public var reason: String
    /// The device found its own metadata inconsistent (a qcow2 image then
    /// marks itself corrupt). Still an I/O error to clients.
    public var isCorruption = false

    public init(_ kind: Kind, _ reason: String) {
        self.kind = kind
        self.reason = reason
    }

    /// Maps a system error from an operation named `what`.
    public init(errno: Errno, _ what: String) {
        switch errno {
        case .noSpace, Errno(28): kind = .noSpace
        case .permission, Errno(30): kind = .readOnly  // EROFS
        case .notSupported, Errno(95): kind = .notSupported
        case .noMemory: kind = .noMemory
        case .invalid: kind = .invalid
        default: kind = .io
        }
        reason = "\(what): \(errno)"
    }

    public var description: String { reason }
}
