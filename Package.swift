// swift-tools-version:6.1
import PackageDescription

let swiftSettings: [SwiftSetting] = [.enableUpcomingFeature("ExistentialAny")]

let package = Package(
    name: "swiftnbd",
    products: [
        .executable(name: "swiftnbd", targets: ["swiftnbd"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.1.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        // C libraries, through pkg-config.
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CLibNBD", pkgConfig: "libnbd", providers: [.apt(["libnbd-dev"])]),
        // GnuTLS's headers (libgnutls28-dev); the library itself is loaded with dlopen when TLS is first set up.
        .target(name: "CGnuTLS"),

        // Bytes <-> NBD messages. No I/O, no Foundation.
        .target(name: "NBDProtocol", swiftSettings: swiftSettings),
        // The only place that calls libc for files and sockets.
        .target(name: "CSystemShims"),
        .target(name: "SystemIO", dependencies: ["CSystemShims"], swiftSettings: swiftSettings),
        // What an export is: the BlockDevice protocol and the raw-file device.
        .target(name: "BlockDevice", dependencies: ["SystemIO"], swiftSettings: swiftSettings),
        // The qcow2 image engine. Knows nothing of NBD.
        .target(name: "QCOW2", dependencies: ["BlockDevice", "SystemIO", "CZlib", "CZstd",
                                             .product(name: "Logging", package: "swift-log")],
                swiftSettings: swiftSettings),
        // TLS sessions and credentials over GnuTLS. Knows nothing of NBD.
        .target(name: "TLS", dependencies: ["CGnuTLS", "SystemIO"], swiftSettings: swiftSettings),
        // Listener, connections, handshake and transmission.
        .target(name: "NBDServer",
                dependencies: ["NBDProtocol", "BlockDevice", "SystemIO", "TLS",
                               .product(name: "Logging", package: "swift-log"),
                               .product(name: "DequeModule", package: "swift-collections")],
                swiftSettings: swiftSettings),
        // Counters fed by the server and the image engine, written as a Prometheus text file.
        .target(name: "NBDMetrics",
                dependencies: ["NBDServer", "NBDProtocol", "BlockDevice", "SystemIO",
                               .product(name: "CoreMetrics", package: "swift-metrics"),
                               .product(name: "Prometheus", package: "swift-prometheus"),
                               .product(name: "Logging", package: "swift-log")],
                swiftSettings: swiftSettings),
        // Glue between the CLI and the modules: probing, configuration, refusals.
        .target(name: "SwiftNBDKit",
                dependencies: ["NBDServer", "QCOW2", "BlockDevice", "SystemIO", "TLS",
                               .product(name: "Logging", package: "swift-log")],
                swiftSettings: swiftSettings),
        .executableTarget(name: "swiftnbd",
                          dependencies: ["SwiftNBDKit", "BlockDevice", "NBDMetrics", "CSystemShims",
                                         .product(name: "ArgumentParser", package: "swift-argument-parser"),
                                         .product(name: "Logging", package: "swift-log")],
                          swiftSettings: swiftSettings),

        // Micro-benchmarks of the hot paths (benchmarks/HotPaths/main.swift); a plain release executable.
        .executableTarget(name: "HotPathBenchmarks", dependencies: ["NBDProtocol", "QCOW2", "BlockDevice", "SystemIO"],
                          path: "benchmarks/HotPaths", swiftSettings: swiftSettings),

        // Test helpers: start servers, make images with qemu-img, drive libnbd.
        .target(name: "TestSupport", dependencies: ["CLibNBD", "SystemIO", "NBDProtocol", "BlockDevice"], path: "Tests/TestSupport",
                swiftSettings: swiftSettings),
        .testTarget(name: "NBDProtocolTests", dependencies: ["NBDProtocol"], swiftSettings: swiftSettings),
        .testTarget(name: "NBDServerTests", dependencies: ["NBDServer", "NBDProtocol", "BlockDevice", "TestSupport", "SystemIO"],
                    swiftSettings: swiftSettings),
        .testTarget(name: "SwiftNBDKitTests", dependencies: ["SwiftNBDKit", "NBDServer", "TLS", "SystemIO"],
                    swiftSettings: swiftSettings),
        .testTarget(name: "NBDMetricsTests", dependencies: ["NBDMetrics", "NBDServer", "NBDProtocol", "BlockDevice", "SystemIO"],
                    swiftSettings: swiftSettings),
        .testTarget(name: "QCOW2Tests", dependencies: ["QCOW2", "BlockDevice", "SystemIO", "TestSupport",
                                                .product(name: "Logging", package: "swift-log")],
                    swiftSettings: swiftSettings),
        .testTarget(name: "IntegrationTests",
                    dependencies: ["TestSupport", "CLibNBD", "NBDProtocol", "SystemIO", "swiftnbd"],
                    swiftSettings: swiftSettings),
        .testTarget(name: "DeploymentTests", dependencies: ["TestSupport", "NBDProtocol", "swiftnbd"],
                    swiftSettings: swiftSettings),
    ]
)

// The fuzz tier (scripts/fuzz.sh): libFuzzer targets under fuzz/. They only
// link with -sanitize=fuzzer, so they exist only when SWIFTNBD_FUZZ is set,
// for a build in its own scratch path; the normal build and `swift test`
// never see them.
if Context.environment["SWIFTNBD_FUZZ"] != nil {
    package.targets.append(.target(name: "CFuzzerDriver", path: "fuzz/Sources/CFuzzerDriver"))
    package.targets.append(.target(name: "FuzzSupport", dependencies: ["CFuzzerDriver", "BlockDevice", "SystemIO"],
                                   path: "fuzz/Sources/FuzzSupport", swiftSettings: swiftSettings))
    let fuzzTargets: [(String, [Target.Dependency])] = [
        ("FuzzNegotiation", ["NBDServer", "NBDProtocol", "BlockDevice"]),
        ("FuzzTransmission", ["NBDServer", "NBDProtocol", "BlockDevice"]),
        ("FuzzQCOW2Metadata", ["QCOW2"]),
        ("FuzzQCOW2Engine", ["QCOW2", "BlockDevice", "SystemIO"]),
        ("FuzzDecompression", ["QCOW2"]),
    ]
    for (name, dependencies) in fuzzTargets {
        package.targets.append(.executableTarget(name: name, dependencies: ["FuzzSupport"] + dependencies,
                                                 path: "fuzz/Sources/\(name)", swiftSettings: swiftSettings))
    }
}
