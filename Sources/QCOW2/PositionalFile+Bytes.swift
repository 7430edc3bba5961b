import SystemIO

extension PositionalFile {
    /// Writes all of `bytes` at `offset`.
    func write(bytes: [UInt8], at offset: UInt64) throws(Errno) {
        // withUnsafeBytes rethrows untyped errors; only Errno can come out of it here.
        do { try bytes.withUnsafeBytes { raw in try write(raw, at: offset) } } catch { throw error as! Errno }
    }

    /// Reads `count` bytes at `offset`.
    func read(count: Int, at offset: UInt64, zeroFillPastEOF: Bool = false) throws(Errno) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        do {
            try bytes.withUnsafeMutableBytes { raw in try read(into: raw, at: offset, zeroFillPastEOF: zeroFillPastEOF) }
        } catch {
            throw error as! Errno
        }
        return bytes
    }
}
