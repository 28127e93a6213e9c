//! Classification of IP addresses for server-side request forgery (SSRF)
//! protection. A postback goes to a URL that a caller chose, so the service
//! must not let that URL reach its own host, its private network or a cloud
//! metadata endpoint.
//!
//! The ranges follow the IANA IPv4 and IPv6 Special-Purpose Address
//! Registries (RFC 6890 and its updates). Where a range is only partly
//! globally reachable (for example 192.0.0.0/24 or 2001::/23), the whole
//! range is treated as not public, because no webhook receiver lives there.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The kind of an IP address, as far as outgoing requests care.
///
/// Only [`AddressClass::Public`] is reachable without an entry in
/// [`AllowedNetworks`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressClass {
    /// Global unicast: IPv4 outside every special range, IPv6 in 2000::/3
    /// outside every special range.
    Public,
    /// 127.0.0.0/8 and ::1.
    Loopback,
    /// 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 and unique local fc00::/7.
    Private,
    /// 169.254.0.0/16 (which includes the cloud metadata address
    /// 169.254.169.254) and fe80::/10.
    LinkLocal,
    /// fec0::/10, deprecated by RFC 3879 but still routed inside some sites.
    SiteLocal,
    /// 100.64.0.0/10, the shared address space of carrier-grade NAT.
    SharedCgnat,
    /// 224.0.0.0/4 and ff00::/8.
    Multicast,
    /// 0.0.0.0 and ::. On Linux a connection to either reaches the local host.
    Unspecified,
    /// 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32 and
    /// 3fff::/20.
    Documentation,
    /// 198.18.0.0/15 and 2001:2::/48.
    Benchmarking,
    /// 255.255.255.255.
    Broadcast,
    /// Every other special or unassigned range, such as 0.0.0.0/8,
    /// 192.0.0.0/24, 240.0.0.0/4, 2001::/23 and IPv6 outside 2000::/3.
    Reserved,
}

impl AddressClass {
    /// Returns true for classes that no allow-list entry can make a postback
    /// destination, because their addresses never name one unicast peer.
    fn is_never_allowed(self) -> bool {
        matches!(self, Self::Unspecified | Self::Multicast | Self::Broadcast)
    }
}

/// Writes the class as a predicate that reads after "address X is".
impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Public => "public",
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::LinkLocal => "link-local",
            Self::SiteLocal => "site-local",
            Self::SharedCgnat => "in the carrier-grade NAT shared range",
            Self::Multicast => "multicast",
            Self::Unspecified => "unspecified",
            Self::Documentation => "reserved for documentation",
            Self::Benchmarking => "reserved for benchmarking",
            Self::Broadcast => "broadcast",
            Self::Reserved => "reserved",
        })
    }
}

/// Classifies an address. IPv6 forms that carry an IPv4 address
/// (IPv4-mapped, IPv4-compatible, NAT64 64:ff9b::/96 and 6to4 2002::/16)
/// get the class of that IPv4 address.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => match embedded_ipv4(v6) {
            Some(v4) => classify_v4(v4),
            None => classify_v6(v6),
        },
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    use AddressClass::*;

    let [a, b, c, _] = ip.octets();
    if ip.is_unspecified() {
        Unspecified
    } else if ip.is_broadcast() {
        Broadcast
    } else if a == 127 {
        Loopback
    } else if a == 10 || (a == 172 && (b & 0xf0) == 16) || (a == 192 && b == 168) {
        Private
    } else if a == 169 && b == 254 {
        LinkLocal
    } else if a == 100 && (b & 0xc0) == 64 {
        SharedCgnat
    } else if (a & 0xf0) == 224 {
        Multicast
    } else if matches!((a, b, c), (192, 0, 2) | (198, 51, 100) | (203, 0, 113)) {
        Documentation
    } else if a == 198 && (b & 0xfe) == 18 {
        Benchmarking
    } else if a == 0
        || (a & 0xf0) == 240
        || (a == 192 && b == 0 && c == 0)
        // Deprecated 6to4 relay anycast (RFC 7526).
        || (a == 192 && b == 88 && c == 99)
    {
        Reserved
    } else {
        Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    use AddressClass::*;

    let segments = ip.segments();
    if ip.is_unspecified() {
        Unspecified
    } else if ip.is_loopback() {
        Loopback
    } else if (segments[0] & 0xfe00) == 0xfc00 {
        Private
    } else if (segments[0] & 0xffc0) == 0xfe80 {
        LinkLocal
    } else if (segments[0] & 0xffc0) == 0xfec0 {
        SiteLocal
    } else if (segments[0] & 0xff00) == 0xff00 {
        Multicast
    } else if (segments[0] == 0x2001 && segments[1] == 0x0db8)
        || (segments[0] == 0x3fff && (segments[1] & 0xf000) == 0)
    {
        Documentation
    } else if segments[0] == 0x2001 && segments[1] == 0x0002 && segments[2] == 0 {
        Benchmarking
    } else if (segments[0] & 0xe000) != 0x2000
        // IETF protocol assignments, Teredo included (2001::/23).
        || (segments[0] == 0x2001 && segments[1] < 0x0200)
        // SRv6 segment identifiers (RFC 9602).
        || segments[0] == 0x5f00
    {
        // Only 2000::/3 is allocated for global unicast; the rest is
        // special or unassigned.
        Reserved
    } else {
        Public
    }
}

/// Returns the IPv4 address that an IPv6 address carries, for the forms that
/// reach or stand for that IPv4 host: IPv4-mapped `::ffff:a.b.c.d`,
/// IPv4-compatible `::a.b.c.d` (but not `::` or `::1`), NAT64
/// `64:ff9b::a.b.c.d` and 6to4 `2002:aabb:ccdd::/48`.
pub fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let segments = ip.segments();
    let low_v4 = Ipv4Addr::new(
        (segments[6] >> 8) as u8,
        segments[6] as u8,
        (segments[7] >> 8) as u8,
        segments[7] as u8,
    );
    match segments {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(low_v4),
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => None,
        [0, 0, 0, 0, 0, 0, _, _] => Some(low_v4),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low_v4),
        [0x2002, high, low, ..] => Some(Ipv4Addr::new(
            (high >> 8) as u8,
            high as u8,
            (low >> 8) as u8,
            low as u8,
        )),
        _ => None,
    }
}

/// Networks that postbacks may reach although they are not public, such as
/// `127.0.0.0/8` for a receiver on the same host. Empty by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowedNetworks {
    networks: Vec<IpNet>,
}

impl AllowedNetworks {
    /// Parses a comma-separated list of CIDR networks, such as
    /// `127.0.0.0/8,::1/128`. A bare address means that one host, and an
    /// empty or blank list means no networks. The error names the entry.
    pub fn parse(list: &str) -> Result<Self, String> {
        if list.trim().is_empty() {
            return Ok(Self::default());
        }

        let mut networks = Vec::new();
        for (index, entry) in list.split(',').enumerate() {
            let entry = entry.trim();
            if entry.is_empty() {
                return Err(format!(
                    "allowed network {} in {list:?} is empty; remove the extra comma",
                    index + 1
                ));
            }
            networks.push(parse_network(entry)?);
        }
        Ok(Self { networks })
    }

    /// Returns true when `ip` is in one of the networks. An IPv6 form that carries an
    /// IPv4 address (see [`embedded_ipv4`]) also matches through that IPv4
    /// address, so allowing `127.0.0.0/8` allows `::ffff:127.0.0.1`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let embedded = match ip {
            IpAddr::V6(v6) => embedded_ipv4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.networks.iter().any(|network| {
            network.contains(&ip) || embedded.is_some_and(|v4| network.contains(&v4))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    pub fn networks(&self) -> &[IpNet] {
        &self.networks
    }
}

fn parse_network(entry: &str) -> Result<IpNet, String> {
    if !entry.contains('/') {
        return entry
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("allowed network {entry:?} is not an IP address or CIDR network, such as 10.0.0.0/8 or fd00::/8"));
    }

    let network: IpNet = entry.parse().map_err(|_| {
        format!(
            "allowed network {entry:?} is not an IP address or CIDR network, such as 10.0.0.0/8 or fd00::/8"
        )
    })?;
    // A network with host bits set, such as 10.0.0.1/8, is usually a typo,
    // and silently widening it to 10.0.0.0/8 could allow more than intended.
    if network.addr() != network.network() {
        return Err(format!(
            "allowed network {entry:?} has host bits set; write it as {}",
            network.trunc()
        ));
    }
    Ok(network)
}

/// The error for an address that a postback must not reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedAddress {
    pub ip: IpAddr,
    pub class: AddressClass,
}

impl fmt::Display for RefusedAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.class.is_never_allowed() {
            write!(
                f,
                "address {} is {} and is never a valid postback destination",
                self.ip, self.class
            )
        } else {
            write!(
                f,
                "address {} is {} and not in the allowed postback networks",
                self.ip, self.class
            )
        }
    }
}

impl std::error::Error for RefusedAddress {}

/// Checks that a postback may connect to `ip`, which must be public or in
/// `allowed`. Unspecified, multicast and broadcast addresses are refused
/// even when allowed, because none of them names a single peer, and a
/// connection to 0.0.0.0 or :: reaches the local host on Linux.
pub fn check(ip: IpAddr, allowed: &AllowedNetworks) -> Result<(), RefusedAddress> {
    let class = classify(ip);
    let permitted = match class {
        AddressClass::Public => true,
        class if class.is_never_allowed() => false,
        _ => allowed.contains(ip),
    };
    if permitted {
        Ok(())
    } else {
        Err(RefusedAddress { ip, class })
    }
}

#[cfg(test)]
mod tests {
    use super::AddressClass::*;
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse()
            .unwrap_or_else(|_| panic!("{text} is not an IP address"))
    }

    const CASES: &[(&str, AddressClass)] = &[
        // IPv4 public, including neighbours of special ranges.
        ("8.8.8.8", Public),
        ("1.1.1.1", Public),
        ("9.255.255.255", Public),
        ("11.0.0.0", Public),
        ("172.15.255.255", Public),
        ("172.32.0.0", Public),
        ("192.167.255.255", Public),
        ("192.169.0.0", Public),
        ("100.63.255.255", Public),
        ("100.128.0.0", Public),
        ("169.253.255.255", Public),
        ("198.17.255.255", Public),
        ("198.20.0.0", Public),
        ("223.255.255.255", Public),
        ("192.0.1.255", Public),
        // IPv4 special ranges.
        ("0.0.0.0", Unspecified),
        ("0.0.0.1", Reserved),
        ("0.255.255.255", Reserved),
        ("127.0.0.1", Loopback),
        ("127.255.255.254", Loopback),
        ("10.0.0.1", Private),
        ("10.255.255.255", Private),
        ("172.16.0.1", Private),
        ("172.31.255.255", Private),
        ("192.168.0.1", Private),
        ("192.168.255.255", Private),
        ("169.254.0.1", LinkLocal),
        ("169.254.169.254", LinkLocal),
        ("100.64.0.1", SharedCgnat),
        ("100.127.255.255", SharedCgnat),
        ("224.0.0.1", Multicast),
        ("239.255.255.255", Multicast),
        ("192.0.2.1", Documentation),
        ("198.51.100.7", Documentation),
        ("203.0.113.200", Documentation),
        ("198.18.0.1", Benchmarking),
        ("198.19.255.255", Benchmarking),
        ("255.255.255.255", Broadcast),
        ("240.0.0.1", Reserved),
        ("255.255.255.254", Reserved),
        ("192.0.0.8", Reserved),
        ("192.0.0.170", Reserved),
        ("192.88.99.1", Reserved),
        // IPv6 public.
        ("2606:4700:4700::1111", Public),
        ("2001:4860:4860::8888", Public),
        ("2a00:1450::1", Public),
        ("2001:200::1", Public),
        ("2001:db9::1", Public),
        // IPv6 special ranges.
        ("::", Unspecified),
        ("::1", Loopback),
        ("fc00::1", Private),
        ("fd12:3456:789a::1", Private),
        ("fe80::1", LinkLocal),
        ("febf:ffff::1", LinkLocal),
        ("fec0::1", SiteLocal),
        ("feff::1", SiteLocal),
        ("ff02::1", Multicast),
        ("ff0e::101", Multicast),
        ("2001:db8::1", Documentation),
        ("2001:db8:ffff::1", Documentation),
        ("3fff::1", Documentation),
        ("3fff:fff::1", Documentation),
        ("3fff:1000::1", Public),
        ("2001:2::1", Benchmarking),
        ("2001:2:0:ffff::1", Benchmarking),
        ("2001::1", Reserved),
        ("2001:1ff::1", Reserved),
        ("100::1", Reserved),
        ("64:ff9b:1::1", Reserved),
        ("5f00::1", Reserved),
        ("4000::1", Reserved),
        ("1::1", Reserved),
        ("::ffff:0:7f00:1", Reserved),
        // IPv4-mapped.
        ("::ffff:127.0.0.1", Loopback),
        ("::ffff:10.1.2.3", Private),
        ("::ffff:169.254.169.254", LinkLocal),
        ("::ffff:0.0.0.0", Unspecified),
        ("::ffff:8.8.8.8", Public),
        // IPv4-compatible.
        ("::127.0.0.1", Loopback),
        ("::192.168.1.1", Private),
        ("::0.0.0.2", Reserved),
        ("::8.8.8.8", Public),
        // NAT64.
        ("64:ff9b::127.0.0.1", Loopback),
        ("64:ff9b::169.254.169.254", LinkLocal),
        ("64:ff9b::100.64.0.1", SharedCgnat),
        ("64:ff9b::8.8.8.8", Public),
        // 6to4.
        ("2002:7f00:1::", Loopback),
        ("2002:a00:1::1", Private),
        ("2002:a9fe:a9fe::1", LinkLocal),
        ("2002:c000:201::1", Documentation),
        ("2002:808:808::1", Public),
    ];

    #[test]
    fn classify_covers_every_range() {
        for (text, expected) in CASES {
            assert_eq!(classify(ip(text)), *expected, "classify({text})");
        }
    }

    #[test]
    fn only_public_addresses_pass_without_allow_list() {
        let none = AllowedNetworks::default();
        for (text, class) in CASES {
            let result = check(ip(text), &none);
            assert_eq!(result.is_ok(), *class == Public, "check({text})");
        }
    }

    #[test]
    fn embedded_ipv4_extracts_each_form() {
        let loopback = Some(Ipv4Addr::LOCALHOST);
        for text in [
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
        ] {
            let IpAddr::V6(v6) = ip(text) else {
                panic!("{text} is not IPv6")
            };
            assert_eq!(embedded_ipv4(v6), loopback, "embedded_ipv4({text})");
        }
    }

    #[test]
    fn embedded_ipv4_skips_plain_ipv6() {
        for text in ["::", "::1", "2001:db8::1", "fe80::1", "64:ff9b:1::7f00:1"] {
            let IpAddr::V6(v6) = ip(text) else {
                panic!("{text} is not IPv6")
            };
            assert_eq!(embedded_ipv4(v6), None, "embedded_ipv4({text})");
        }
    }

    #[test]
    fn allow_list_parses_networks_and_hosts() {
        let allowed = AllowedNetworks::parse(" 127.0.0.0/8 , ::1/128,10.1.2.3,fd00::1").unwrap();
        assert_eq!(allowed.networks().len(), 4);
        assert!(allowed.contains(ip("127.1.2.3")));
        assert!(allowed.contains(ip("::1")));
        assert!(allowed.contains(ip("10.1.2.3")));
        assert!(!allowed.contains(ip("10.1.2.4")));
        assert!(allowed.contains(ip("fd00::1")));
        assert!(!allowed.contains(ip("fd00::2")));
    }

    #[test]
    fn allow_list_empty_string_allows_nothing() {
        for list in ["", "  "] {
            let allowed = AllowedNetworks::parse(list).unwrap();
            assert!(allowed.is_empty(), "parse({list:?})");
            assert!(!allowed.contains(ip("127.0.0.1")), "parse({list:?})");
        }
    }

    #[test]
    fn allow_list_matches_embedded_ipv4() {
        let allowed = AllowedNetworks::parse("127.0.0.0/8").unwrap();
        for text in [
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::1",
        ] {
            assert!(allowed.contains(ip(text)), "contains({text})");
        }
        assert!(!allowed.contains(ip("::1")), "::1 is not in 127.0.0.0/8");
    }

    #[test]
    fn allow_list_rejects_bad_entries() {
        let error = AllowedNetworks::parse("127.0.0.0/8,localhost").unwrap_err();
        assert!(error.contains("\"localhost\""), "{error}");

        let error = AllowedNetworks::parse("10.0.0.0/33").unwrap_err();
        assert!(error.contains("\"10.0.0.0/33\""), "{error}");

        let error = AllowedNetworks::parse("10.0.0.0/8,,::1").unwrap_err();
        assert!(error.contains("allowed network 2"), "{error}");
    }

    #[test]
    fn allow_list_rejects_host_bits() {
        let error = AllowedNetworks::parse("10.0.0.1/8").unwrap_err();
        assert!(error.contains("\"10.0.0.1/8\""), "{error}");
        assert!(error.contains("10.0.0.0/8"), "{error}");
    }

    #[test]
    fn check_passes_allowed_private_address() {
        let allowed = AllowedNetworks::parse("10.0.0.0/8,127.0.0.0/8").unwrap();
        assert_eq!(check(ip("10.0.0.1"), &allowed), Ok(()));
        assert_eq!(check(ip("::ffff:127.0.0.1"), &allowed), Ok(()));
        assert!(check(ip("192.168.0.1"), &allowed).is_err());
    }

    #[test]
    fn check_refuses_unspecified_even_when_allowed() {
        let everything = AllowedNetworks::parse("0.0.0.0/0,::/0").unwrap();
        for text in [
            "0.0.0.0",
            "::",
            "::ffff:0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(check(ip(text), &everything).is_err(), "check({text})");
        }
        assert_eq!(check(ip("127.0.0.1"), &everything), Ok(()));
    }

    #[test]
    fn refusal_names_address_and_class() {
        let error = check(ip("10.0.0.1"), &AllowedNetworks::default()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "address 10.0.0.1 is private and not in the allowed postback networks"
        );

        let error = check(ip("::"), &AllowedNetworks::default()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "address :: is unspecified and is never a valid postback destination"
        );
    }
}
