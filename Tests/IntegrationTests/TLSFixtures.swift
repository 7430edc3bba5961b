import Foundation
import TestSupport

/// A 16 MiB qcow2 image with data in a few places, the raw bytes it holds, and
/// a raw file of other bytes to write over it.
struct QCOW2TLSFixture {
    let scratch: TemporaryDirectory
    let image: String
    let expected: Data
    let upload: String
    static let size = 16 << 20

    init() throws {
        scratch = try TemporaryDirectory()
        image = scratch.file("disk.qcow2")
        try ImageFactory.create(image, format: "qcow2", size: "16M")
        try ImageFactory.io(image, format: "qcow2", ["write -P 0x5a 0 1M", "write -P 0xa5 5M 300k",
                                                     "write -P 0x11 15M 1M"])
        expected = try ImageFactory.rawContents(of: image, format: "qcow2", scratch: scratch)
        upload = scratch.file("upload.raw")
        try ImageFactory.patternedRaw(upload, size: Self.size, seed: 7)
    }

    /// The image's bytes now, as qemu-img reads them (the server must have stopped).
    var contents: Data { get throws { try ImageFactory.rawContents(of: image, format: "qcow2", scratch: scratch) } }
}

/// qemu's client-side options for the same credentials.
enum QemuTLS {
    static func x509(_ dir: String) -> [String] {
        ["--object", "tls-creds-x509,id=tls0,dir=\(dir),endpoint=client"]
    }

    static func psk(_ dir: String, user: String = "alice") -> [String] {
        ["--object", "tls-creds-psk,id=tls0,dir=\(dir),endpoint=client,username=\(user)"]
    }

    static func imageOpts(port: Int) -> String {
        "driver=nbd,host=127.0.0.1,port=\(port),tls-creds=tls0"
    }
}
