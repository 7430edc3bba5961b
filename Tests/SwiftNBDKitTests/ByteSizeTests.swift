import SwiftNBDKit
import Testing

/// `--cache-size` and `cache-size=` take qemu-img's size spellings.
@Suite struct ByteSizeTests {
    @Test(arguments: [("0", 0), ("4096", 4096), ("64k", 64 << 10), ("64K", 64 << 10), ("32M", 32 << 20),
                      ("1g", 1 << 30), ("2T", 2 << 40)])
    func parses(_ text: String, _ bytes: Int) {
        #expect(ByteSize.parse(text) == bytes)
    }

    @Test(arguments: ["", "K", "12X", "1.5M", "-1", "1 M", "99999999999T", "١٢"])
    func refuses(_ text: String) {
        #expect(ByteSize.parse(text) == nil)
    }
}
