/// Sizes given on the command line: a number of bytes, optionally with a
/// binary suffix as qemu-img takes them (`64K`, `32M`, `1G`).
public enum ByteSize {
    /// The bytes `text` stands for, or nil if it is not a size (or overflows).
    public static func parse(_ text: String) -> Int? {
        var digits = Substring(text)
        var shift = 0
        if let last = digits.last, !last.isNumber {
            guard let power = ["k": 10, "m": 20, "g": 30, "t": 40][last.lowercased()] else { return nil }
            shift = power
            digits = digits.dropLast()
        }
        guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }), let value = Int(digits),
              value <= Int.max >> shift else { return nil }
        return value << shift
    }
}
