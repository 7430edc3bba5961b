/// The keys of a PSK file: `username:hexkey` lines, as `psktool` writes them
/// and libnbd's `tls-psk-file` and qemu's `tls-creds-psk` read them.
public struct PSKKeys: Sendable, Equatable {
    public private(set) var keys: [String: [UInt8]] = [:]

    /// Parses the file's text; `name` is only used in error messages.
    public init(parsing bytes: [UInt8], name: String) throws(TLSError) {
        var lineNumber = 0
        for line in bytes.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
            lineNumber += 1
            var text = line[...]
            while let last = text.last, last == UInt8(ascii: "\r") || last == UInt8(ascii: " ") || last == 9 {
                text = text.dropLast()
            }
            if text.isEmpty { continue }
            guard let colon = text.firstIndex(of: UInt8(ascii: ":")), colon > text.startIndex,
                  let user = String(validating: text[..<colon], as: UTF8.self),
                  let key = Self.hex(text[(colon + 1)...]), !key.isEmpty
            else {
                throw .credentials("'\(name)' line \(lineNumber): expected username:hexkey")
            }
            // GnuTLS's own reader takes the first entry for a name; so do we.
            if keys[user] == nil { keys[user] = key }
        }
        guard !keys.isEmpty else { throw .credentials("'\(name)' holds no username:hexkey line") }
    }

    static func hex(_ digits: ArraySlice<UInt8>) -> [UInt8]? {
        guard digits.count % 2 == 0 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(digits.count / 2)
        var high: UInt8?
        for d in digits {
            let v: UInt8
            switch d {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): v = d - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): v = d - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): v = d - UInt8(ascii: "A") + 10
            default: return nil
            }
            if let h = high {
                out.append(h << 4 | v)
                high = nil
            } else {
                high = v
            }
        }
        return out
    }
}
