#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A stable name for a file: absolute, with symlinks, `.` and `..` resolved
/// (realpath(3)). A path that does not exist yet is only made absolute and
/// tidied, so two spellings of one missing file still compare equal.
public func canonicalPath(_ path: String) -> String {
    if let resolved = realpath(path, nil) {
        defer { free(resolved) }
        return String(cString: resolved)
    }
    var absolute = path
    if !path.hasPrefix("/"), let cwd = getcwd(nil, 0) {
        absolute = String(cString: cwd) + "/" + path
        free(cwd)
    }
    var parts: [Substring] = []
    for part in absolute.split(separator: "/", omittingEmptySubsequences: true) {
        switch part {
        case ".": continue
        case "..": _ = parts.popLast()
        default: parts.append(part)
        }
    }
    return "/" + parts.joined(separator: "/")
}
