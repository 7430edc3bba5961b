import SystemIO

/// Entry points that need no open device.
public enum QCOW2 {
    /// The four bytes every qcow2 image starts with: "QFI\xfb".
    public static let magic: UInt32 = 0x5146_49FB

    /// Whether the file at `path` starts with the qcow2 magic. Unreadable or
    /// short files are not qcow2; the caller then treats them as raw and
    /// reports its own open error.
    public static func hasMagic(path: String) -> Bool {
        guard let file = try? FileHandle.open(path, mode: .readOnly) else { return false }
        defer { file.close() }
        var bytes: [UInt8] = [0, 0, 0, 0]
        let ok = bytes.withUnsafeMutableBytes { buffer in
            (try? file.read(into: buffer, at: 0)) != nil
        }
        return ok && hasMagic(bytes)
    }

    /// Whether `bytes` start with the qcow2 magic.
    public static func hasMagic(_ bytes: [UInt8]) -> Bool {
        var cursor = ByteCursor(bytes)
        return cursor.read(UInt32.self) == magic
    }
}
