#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// An IPv4 or IPv6 address, as a number in network order's reading.
public enum IPAddress: Hashable, Sendable, CustomStringConvertible {
    case v4(UInt32)
    case v6(UInt128)

    /// Parses dotted-quad IPv4 or any IPv6 text form (inet_pton).
    public init?(_ text: String) {
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            self = .v4(UInt32(bigEndian: v4.s_addr))
            return
        }
        var v6 = in6_addr()
        guard inet_pton(AF_INET6, text, &v6) == 1 else { return nil }
        self = .v6(withUnsafeBytes(of: &v6) { Self.number($0) })
    }

    init(_ address: in_addr) { self = .v4(UInt32(bigEndian: address.s_addr)) }

    init(_ address: in6_addr) {
        var copy = address
        self = .v6(withUnsafeBytes(of: &copy) { Self.number($0) })
    }

    private static func number(_ bytes: UnsafeRawBufferPointer) -> UInt128 {
        bytes.reduce(UInt128(0)) { $0 << 8 | UInt128($1) }
    }

    /// An IPv4-mapped IPv6 address (::ffff:a.b.c.d) as the IPv4 address it carries.
    public var unmapped: IPAddress {
        if case .v6(let n) = self, n >> 32 == 0xffff { return .v4(UInt32(truncatingIfNeeded: n)) }
        return self
    }

    /// 127.0.0.0/8, ::1, or an IPv4-mapped loopback address.
    public var isLoopback: Bool {
        switch unmapped {
        case .v4(let n): n >> 24 == 127
        case .v6(let n): n == 1
        }
    }

    public var description: String {
        switch self {
        case .v4(let n):
            return "\(n >> 24).\(n >> 16 & 0xff).\(n >> 8 & 0xff).\(n & 0xff)"
        case .v6(let n):
            var address = in6_addr()
            withUnsafeMutableBytes(of: &address) { raw in
                for i in 0..<16 { raw[i] = UInt8(truncatingIfNeeded: n >> UInt128(8 * (15 - i))) }
            }
            var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
            inet_ntop(AF_INET6, &address, &text, socklen_t(text.count))
            return String(cString: text)
        }
    }
}
