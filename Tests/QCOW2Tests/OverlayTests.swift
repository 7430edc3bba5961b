import BlockDevice
import Foundation
@testable import QCOW2
import TestSupport
import Testing

/// QCOW2.createOverlay makes an image qemu accepts, that reads as its
/// backing file and takes writes without touching it (qemu-nbd -s).
@Suite struct OverlayTests {
    @Test(arguments: ["raw", "qcow2"], [16, 9])
    func overlay(format: String, clusterBits: Int) throws {
        let dir = try TemporaryDirectory("qcow2-overlay")
        let base: String
        if format == "raw" {
            base = dir.file("base.raw")
            try ImageFactory.patternedRaw(base, size: 3 << 20)
        } else {
            base = try ChainAndFeatureTests.makeChain(dir)
        }
        let baseContents = try ImageFactory.rawContents(of: base, format: format, scratch: dir)
        let overlay = dir.file("overlay.qcow2")
        try QCOW2.createOverlay(at: overlay, backingFile: base, backingFormat: format,
                                size: UInt64(baseContents.count), clusterBits: clusterBits)
        try Q.img(["check", "-q", "-f", "qcow2", overlay])
        #expect(try Tools.check("qemu-img", ["info", overlay]).contains("backing file format: \(format)"))
        let device = try QCOW2Device(path: overlay, readOnly: false)
        var model = [UInt8](baseContents)
        try Q.expectSameContents(device, model)
        try WriteTests.apply(WriteTests.randomOps(count: 60, size: device.size, cluster: 1 << UInt64(clusterBits),
                                                  seed: 11), to: device, model: &model)
        device.close()
        try WriteTests.expectConsistent(overlay, model: model, dir: dir)
        #expect(try ImageFactory.rawContents(of: base, format: format, scratch: dir) == baseContents)
    }

    @Test func refusesImpossibleArguments() {
        #expect(throws: QCOW2Error.invalidClusterBits(8)) {
            try QCOW2.overlayBytes(backingFile: "b", backingFormat: "raw", size: 1, clusterBits: 8)
        }
        #expect(throws: QCOW2Error.invalidBackingFileName) {
            try QCOW2.overlayBytes(backingFile: "", backingFormat: "raw", size: 1, clusterBits: 16)
        }
        #expect(throws: QCOW2Error.invalidSize(1 << 63)) {
            try QCOW2.overlayBytes(backingFile: "b", backingFormat: "raw", size: 1 << 63, clusterBits: 16)
        }
    }
}
