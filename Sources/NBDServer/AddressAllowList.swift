import SystemIO

/// The client addresses let in (TCP clients; Unix socket clients are guarded
/// by the socket file's permissions). Checked at accept, before any
/// handshake work, with or without TLS.
public struct AddressAllowList: Sendable, Equatable {
    /// A network: addresses whose first `prefix` bits are `network`'s.
    public struct Network: Sendable, Equatable, CustomStringConvertible {
        public var network: IPAddress
        public var prefix: Int

        /// Parses `ADDRESS` or `ADDRESS/PREFIX` (IPv4 or IPv6); nil if it is neither.
        public init?(_ text: String) {
            let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
            guard let address = IPAddress(String(parts[0])) else { return nil }
            let bits = if case .v4 = address { 32 } else { 128 }
            if parts.count == 2 {
                guard let prefix = Int(parts[1]), (0...bits).contains(prefix) else { return nil }
                self.prefix = prefix
            } else {
                prefix = bits
            }
            network = address
        }

        public func contains(_ address: IPAddress) -> Bool {
            switch (network, address.unmapped) {
            case (.v4(let net), .v4(let a)):
                return prefix == 0 || net >> (32 - prefix) == a >> (32 - prefix)
            case (.v6(let net), .v6(let a)):
                return prefix == 0 || net >> (128 - prefix) == a >> (128 - prefix)
            default:
                return false
            }
        }

        public var description: String { "\(network)/\(prefix)" }
    }

    public var networks: [Network]

    public init(_ networks: [Network]) { self.networks = networks }

    public func allows(_ address: IPAddress) -> Bool { networks.contains { $0.contains(address) } }
}
