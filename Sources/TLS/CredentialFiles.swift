import SystemIO

/// Reading the files credentials come from, with messages that name the file.
enum CredentialFiles {
    /// Credential files are small; anything larger is not one.
    static let maxSize: UInt64 = 1 << 20

    static func read(_ path: String) throws(TLSError) -> [UInt8] {
        let file: FileHandle
        do {
            file = try FileHandle.open(path, mode: .readOnly)
        } catch {
            throw .credentials("cannot read '\(path)': \(error)")
        }
        defer { file.close() }
        let size: UInt64
        do { size = try file.size() } catch { throw .credentials("cannot read '\(path)': \(error)") }
        guard size <= maxSize else { throw .credentials("'\(path)' is too large to be a credentials file") }
        var bytes = [UInt8](repeating: 0, count: Int(size))
        let result = bytes.withUnsafeMutableBytes { raw in Result { () throws(Errno) in try file.read(into: raw, at: 0) } }
        if case .failure(let error) = result { throw .credentials("cannot read '\(path)': \(error)") }
        return bytes
    }

    static func exists(_ path: String) -> Bool {
        (try? FileHandle.open(path, mode: .readOnly)).map { $0.close(); return true } ?? false
    }
}
