#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CSystemShims

/// An open file descriptor on a regular file or block device, with
/// full-length positional I/O. Safe to share between threads: every call is
/// positional, nothing keeps a file offset.
public struct FileHandle: Sendable, Hashable {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    public enum Mode: Sendable { case readOnly, readWrite }

    public static func open(_ path: String, mode: Mode, create: Bool = false) throws(Errno) -> FileHandle {
        var flags = (mode == .readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC
        if create { flags |= O_CREAT }
        let fd = try retryingEINTR { Glibc.open(path, flags, 0o644) }
        return FileHandle(rawValue: fd)
    }

    public func close() {
        _ = Glibc.close(rawValue)
    }

    /// Reads exactly `buffer.count` bytes at `offset`. Bytes past the end of
    /// the file read as zeros when `zeroFillPastEOF`, else they are an EIO.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64,
                     zeroFillPastEOF: Bool) throws(Errno) {
        var done = 0
        while done < buffer.count {
            let n = try retryingEINTR {
                Glibc.pread(rawValue, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            }
            if n == 0 {
                guard zeroFillPastEOF else { throw Errno.io }
                UnsafeMutableRawBufferPointer(rebasing: buffer[done...]).initializeMemory(as: UInt8.self, repeating: 0)
                return
            }
            done += n
        }
    }

    /// Fills `buffer` from `offset` only if the page cache holds every byte (preadv2
    /// RWF_NOWAIT), so the caller never waits for storage; false when it would have to.
    public func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        var done = 0
        while done < buffer.count {
            let n = cshim_pread_nowait(rawValue, buffer.baseAddress! + done, buffer.count - done,
                                       off_t(offset) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return false }
            done += n
        }
        return true
    }

    /// Writes all of `data` at `offset`.
    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws(Errno) {
        var done = 0
        while done < data.count {
            let n = try retryingEINTR {
                Glibc.pwrite(rawValue, data.baseAddress! + done, data.count - done, off_t(offset) + off_t(done))
            }
            done += n
        }
    }

    public func size() throws(Errno) -> UInt64 {
        var st = stat()
        _ = try retryingEINTR { fstat(rawValue, &st) }
        if (st.st_mode & S_IFMT) == S_IFBLK {
            let end = try retryingEINTR { lseek(rawValue, 0, SEEK_END) }
            return UInt64(end)
        }
        return UInt64(st.st_size)
    }

    public func truncate(to size: UInt64) throws(Errno) {
        _ = try retryingEINTR { ftruncate(rawValue, off_t(size)) }
    }

    public func sync() throws(Errno) {
        _ = try retryingEINTR { fdatasync(rawValue) }
    }

    /// The start of the next data region at or after `offset`, or nil when
    /// only a hole remains. Throws `.notSupported` where SEEK_DATA is not.
    public func nextData(from offset: UInt64) throws(Errno) -> UInt64? {
        let r = cshim_seek_data(rawValue, off_t(offset))
        if r >= 0 { return UInt64(r) }
        if errno == ENXIO { return nil }
        if errno == EINVAL || errno == EOPNOTSUPP { throw Errno.notSupported }
        throw Errno.current
    }

    /// The start of the next hole at or after `offset` (end of file counts as a hole).
    public func nextHole(from offset: UInt64) throws(Errno) -> UInt64 {
        let r = cshim_seek_hole(rawValue, off_t(offset))
        if r >= 0 { return UInt64(r) }
        if errno == EINVAL || errno == EOPNOTSUPP { throw Errno.notSupported }
        throw Errno.current
    }

    /// Deallocates a range, which then reads as zeros.
    public func punchHole(at offset: UInt64, length: UInt64) throws(Errno) {
        _ = try retryingEINTR {
            cshim_punch_hole(rawValue, off_t(offset), off_t(length))
        }
    }

    /// Makes a range read as zeros, keeping it allocated.
    public func zeroRange(at offset: UInt64, length: UInt64) throws(Errno) {
        _ = try retryingEINTR {
            cshim_zero_range(rawValue, off_t(offset), off_t(length))
        }
    }

    /// Hints the kernel to read a range into the page cache.
    public func prefetch(at offset: UInt64, length: UInt64) {
        _ = posix_fadvise(rawValue, off_t(offset), off_t(length), POSIX_FADV_WILLNEED)
    }
}

/// What a path names, from stat(2) (symlinks followed).
public enum FileKind: Sendable, Equatable {
    case regular, directory, blockDevice, characterDevice, fifo, socket, other

    /// The kind of file at `path`, or the stat error.
    public static func of(path: String) throws(Errno) -> FileKind {
        let mode = cshim_stat_mode(path)
        guard mode >= 0 else { throw Errno.current }
        switch mode_t(mode) & S_IFMT {
        case S_IFREG: return .regular
        case S_IFDIR: return .directory
        case S_IFBLK: return .blockDevice
        case S_IFCHR: return .characterDevice
        case S_IFIFO: return .fifo
        case S_IFSOCK: return .socket
        default: return .other
        }
    }
}
