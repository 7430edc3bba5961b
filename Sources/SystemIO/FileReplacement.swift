#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension FileHandle {
    /// Replaces the file at `path` with `contents` so that a reader sees the
    /// old file or the new one, never a part: the bytes go to `path.tmp`,
    /// which is then renamed over `path`. `permissions` are set whatever the
    /// umask. Not durable across power loss (no fsync): for files rewritten often.
    public static func replace(_ path: String, contents: [UInt8], permissions: mode_t) throws(Errno) {
        let temporary = path + ".tmp"
        let file = try open(temporary, mode: .readWrite, create: true)
        do throws(Errno) {
            defer { file.close() }
            _ = try retryingEINTR { fchmod(file.rawValue, permissions) }
            try file.truncate(to: 0)
            let written = contents.withUnsafeBytes { bytes in Result { () throws(Errno) in try file.write(bytes, at: 0) } }
            try written.get()
            _ = try retryingEINTR { rename(temporary, path) }
        } catch {
            unlink(temporary)
            throw error
        }
    }
}
