import BlockDevice
import Logging
import NBDProtocol
@testable import NBDServer
import TestSupport
import Testing

/// A device with one bitmap, "backup": the first half of every 64 KiB is dirty.
final class BitmapDevice: BlockDevice, @unchecked Sendable {
    let size: UInt64 = 1 << 20
    let capabilities = DeviceCapabilities(canWrite: false)
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DeviceError) {
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
    }
    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws(DeviceError) {}
    func flush() throws(DeviceError) {}
    func trim(at offset: UInt64, length: UInt64, fua: Bool) throws(DeviceError) {}
    func writeZeroes(at offset: UInt64, length: UInt64, mayDeallocate: Bool, fast: Bool,
                     fua: Bool) throws(DeviceError) {}
    func extents(at offset: UInt64, length: UInt64) throws(DeviceError) -> [Extent] {
        [Extent(length: length, flags: [])]
    }
    func dirtyBitmapExtents(named name: String, at offset: UInt64,
                            length: UInt64) throws(DeviceError) -> [BitmapExtent] {
        guard name == "backup" else { throw DeviceError(.invalid, "no bitmap '\(name)'") }
        var result: [BitmapExtent] = []
        var at = offset
        while at < offset + length {
            let next = min((at / 32768 + 1) * 32768, offset + length)
            result.append(BitmapExtent(length: next - at, dirty: (at / 32768) % 2 == 0))
            at = next
        }
        return result
    }
    func close() {}
}

/// `qemu:dirty-bitmap:NAME` contexts: offered per export, with IDs that do
/// not depend on what a client asks for, answered from the device's bitmap.
@Suite struct DirtyBitmapContextTests {
    func send(_ n: inout Negotiation, _ option: OptionCode, _ exportName: String, _ queries: [String]) -> [OptionReply] {
        var w = WireWriter()
        MetaContextRequest(exportName: exportName, queries: queries).encode(into: &w)
        guard case .reply(let replies) = w.bytes.withUnsafeBytes({ n.received(option, payload: $0) }) else { return [] }
        return replies
    }

    @Test(arguments: [false, true])
    func bitmapContextsHaveStableIDs(_ depth: Bool) {
        let export = Export(name: "", device: BitmapDevice(), readOnly: true, exposeAllocationDepth: depth,
                            dirtyBitmaps: ["daily", "backup"])
        var n = Negotiation(exports: [export], clientFlags: [.fixedNewstyle])
        let listed = send(&n, .listMetaContext, "", ["qemu:dirty-bitmap:"])
        #expect(listed == [.metaContext(.listMetaContext, id: 0, name: "qemu:dirty-bitmap:daily"),
                           .metaContext(.listMetaContext, id: 0, name: "qemu:dirty-bitmap:backup"),
                           .ack(.listMetaContext)])
        _ = n.received(.structuredReply, payload: UnsafeRawBufferPointer(start: nil, count: 0))
        // Asked for alone, "backup" keeps the ID it has when every context is chosen.
        let chosen = send(&n, .setMetaContext, "", ["qemu:dirty-bitmap:backup"])
        #expect(chosen == [.metaContext(.setMetaContext, id: 4, name: "qemu:dirty-bitmap:backup"), .ack(.setMetaContext)])
        let unknown = send(&n, .setMetaContext, "", ["qemu:dirty-bitmap:other"])
        #expect(unknown == [.ack(.setMetaContext)])
    }

    @Test func dirtyRunsHaveStatusOne() throws {
        let context = MetaContext.dirtyBitmap("backup", id: 3)
        let handler = RequestHandler(device: BitmapDevice(), session: Session(structuredReplies: true,
                                                                              metaContexts: [context]),
                                     buffers: BufferPool(), counters: TransferCounters(), logger: Logger(label: "test"))
        let descriptors = try handler.descriptors(of: context, at: 16384, length: 65536, limit: 10)
        #expect(descriptors == [BlockStatusDescriptor(length: 16384, flags: 1),
                                BlockStatusDescriptor(length: 32768, flags: 0),
                                BlockStatusDescriptor(length: 16384, flags: 1)])
        #expect(throws: DeviceError.self) {
            try handler.descriptors(of: .dirtyBitmap("gone", id: 3), at: 0, length: 4096, limit: 10)
        }
    }
}
