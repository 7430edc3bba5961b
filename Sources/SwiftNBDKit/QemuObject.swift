/// One `--object TYPE,KEY=VALUE,...` as qemu-nbd takes it: the first field is
/// the type, then properties; ",," stands for a literal comma (QemuOpts), so
/// a distinguished name such as `CN=a,,O=b` survives.
public struct QemuObject: Sendable, Equatable {
    public var type: String
    public var properties: [String: String]
    public var id: String { properties["id"] ?? "" }

    /// The reason `text` is not an object spec.
    public struct ParseError: Error, CustomStringConvertible {
        public var description: String
    }

    public init(parsing text: String) throws(ParseError) {
        var fields = [""]
        var i = text.startIndex
        while i < text.endIndex {
            let next = text.index(after: i)
            if text[i] == "," {
                if next < text.endIndex && text[next] == "," {
                    fields[fields.count - 1].append(",")
                    i = text.index(after: next)
                } else {
                    fields.append("")
                    i = next
                }
                continue
            }
            fields[fields.count - 1].append(text[i])
            i = next
        }
        let first = fields.removeFirst()
        // qemu also takes "qom-type=TYPE" as the first field.
        type = first.hasPrefix("qom-type=") ? String(first.dropFirst(9)) : first
        guard !type.isEmpty, !type.contains("=") else {
            throw ParseError(description: "--object '\(text)': expected TYPE,id=ID,...")
        }
        properties = [:]
        for field in fields {
            guard let eq = field.firstIndex(of: "="), eq != field.startIndex else {
                throw ParseError(description: "--object '\(text)': '\(field)' is not KEY=VALUE")
            }
            let key = String(field[..<eq])
            guard properties[key] == nil else {
                throw ParseError(description: "--object '\(text)': '\(key)' is given twice")
            }
            properties[key] = String(field[field.index(after: eq)...])
        }
        guard !id.isEmpty else { throw ParseError(description: "--object '\(text)': id= is required") }
    }

    /// A qemu boolean property: on/off, yes/no, true/false.
    func flag(_ key: String, default value: Bool) throws(ParseError) -> Bool {
        guard let text = properties[key] else { return value }
        switch text {
        case "on", "yes", "true": return true
        case "off", "no", "false": return false
        default: throw ParseError(description: "--object \(type) '\(id)': \(key)=\(text) is not on or off")
        }
    }
}
