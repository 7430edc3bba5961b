import NBDServer
import SystemIO
import Testing

/// CIDR matching for --allow-address, IPv4 and IPv6.
@Suite struct AddressAllowListTests {
    @Test(arguments: [
        ("127.0.0.0/8", "127.1.2.3", true),
        ("127.0.0.0/8", "128.0.0.1", false),
        ("192.0.2.7", "192.0.2.7", true),
        ("192.0.2.7", "192.0.2.8", false),
        ("0.0.0.0/0", "203.0.113.9", true),
        ("10.0.0.0/8", "::ffff:10.1.1.1", true),   // IPv4-mapped IPv6 matches IPv4 rules
        ("10.0.0.0/8", "::1", false),
        ("::1", "::1", true),
        ("::1", "127.0.0.1", false),
        ("fd00::/8", "fd12:3456::1", true),
        ("fd00::/8", "fe80::1", false),
        ("2001:db8::/127", "2001:db8::1", true),
        ("2001:db8::/127", "2001:db8::2", false),
        ("::/0", "2001:db8::2", true),
    ])
    func matches(rule: String, address: String, allowed: Bool) throws {
        let network = try #require(AddressAllowList.Network(rule))
        let ip = try #require(IPAddress(address))
        #expect(AddressAllowList([network]).allows(ip) == allowed)
    }

    @Test(arguments: ["", "127.0.0.1/33", "::1/129", "10.0.0.0/-1", "10.0.0/8", "host.example", "1.2.3.4/x"])
    func rejectsMalformedRules(rule: String) {
        #expect(AddressAllowList.Network(rule) == nil)
    }

    @Test func printsAddressesAsInetNtopDoes() throws {
        #expect(try #require(IPAddress("127.0.0.1")).description == "127.0.0.1")
        #expect(try #require(IPAddress("2001:db8:0:0:0:0:0:1")).description == "2001:db8::1")
        #expect(try #require(IPAddress("::ffff:10.1.2.3")).unmapped.description == "10.1.2.3")
    }
}
