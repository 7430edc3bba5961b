import Foundation
import TestSupport

/// A scratch directory with a patterned, sparse raw image in it.
struct RawFixture {
    let scratch: TemporaryDirectory
    let image: String
    let size: Int

    init(size: Int = 16 << 20) throws {
        scratch = try TemporaryDirectory()
        image = scratch.file("disk.raw")
        self.size = size
        try ImageFactory.patternedRaw(image, size: size)
    }

    var contents: Data { get throws { try Data(contentsOf: URL(fileURLWithPath: image)) } }
}

func jsonObject(_ text: String) throws -> Any {
    try JSONSerialization.jsonObject(with: Data(text.utf8))
}
