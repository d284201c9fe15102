//! Which endpoints a REGISTER may name. Some addresses are never a backend
//! (unspecified, broadcast, multicast, link-local, where the cloud metadata
//! service lives): an ingress sent there would reach something that is not
//! a replica. A loopback address means "this host" only to a sender on this
//! host. `--allow-register CIDR` narrows further: the registered endpoint
//! must lie in one of the networks (the endpoint, not the sender, since the
//! endpoint is what the ingress will connect to). Pure.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use crate::cidr::{Cidr, CidrError};

/// Why a REGISTER was refused; shown after `ERR|REGISTER refused: `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is an unspecified address, never a backend")]
    Unspecified(IpAddr),
    #[error("{0} is a broadcast address, never a backend")]
    Broadcast(IpAddr),
    #[error("{0} is a multicast address, never a backend")]
    Multicast(IpAddr),
    #[error("{0} is link-local (cloud metadata lives there), never a backend")]
    LinkLocal(IpAddr),
    #[error("{0} is reserved (240.0.0.0/4), never a backend")]
    Reserved(IpAddr),
    #[error("{0} is a cloud metadata service, never a backend")]
    Metadata(IpAddr),
    #[error("{0} is loopback; only a sender on the Tower's own host may register it")]
    RemoteLoopback(IpAddr),
    #[error("{0} is outside the networks this Tower accepts (--allow-register)")]
    NotAllowed(IpAddr),
}

/// The Tower's rules for registered endpoints.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    /// Empty: any address that can be a backend.
    allow: Vec<Cidr>,
}

impl Admission {
    pub fn new(allow: Vec<Cidr>) -> Self {
        Self { allow }
    }

    /// Whether `endpoint` may be registered by a datagram or request from
    /// `sender`.
    pub fn check(&self, endpoint: IpAddr, sender: IpAddr) -> Result<(), Refusal> {
        never_a_backend(endpoint)?;
        let ip = endpoint.to_canonical();
        if reaches(ip).is_loopback() && !sender.to_canonical().is_loopback() {
            return Err(Refusal::RemoteLoopback(ip));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|c| c.contains(ip)) {
            return Err(Refusal::NotAllowed(ip));
        }
        Ok(())
    }

    /// Whether an endpoint that reached this Tower another way (written to
    /// etcd by another Tower, or by hand) may be served: the same rules, but
    /// its sender is not known, so loopback is taken as it is.
    pub fn serves(&self, endpoint: IpAddr) -> bool {
        let ip = endpoint.to_canonical();
        never_a_backend(ip).is_ok()
            && (self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip)))
    }
}

/// Cloud metadata services outside the link-local ranges: AWS's over
/// IPv6, Alibaba's, and Azure's wire server.
const METADATA: [IpAddr; 3] = [
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)),
];

/// The address a connection to `ip` ends up at: the IPv4 address an IPv6
/// one carries where the network unwraps it (IPv4-mapped and -translated,
/// the deprecated IPv4-compatible form, NAT64's 64:ff9b::/96 and
/// 64:ff9b:1::/48, 6to4's 2002::/16), else `ip` itself.
fn reaches(ip: IpAddr) -> IpAddr {
    let v6 = match ip.to_canonical() {
        IpAddr::V6(v6) => v6,
        v4 => return v4,
    };
    let s = v6.segments();
    let low32 = Ipv4Addr::from(u128::from(v6) as u32);
    let embedded = match s {
        // ::a.b.c.d (not :: or ::1) and ::ffff:0:a.b.c.d
        [0, 0, 0, 0, 0, 0, _, _] if u128::from(v6) > 1 => Some(low32),
        [0, 0, 0, 0, 0xffff, 0, _, _] => Some(low32),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low32),
        [0x64, 0xff9b, 1, ..] => Some(low32),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))),
        _ => None,
    };
    embedded.map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// Addresses no replica can listen on, IPv4 carried in IPv6 included.
fn never_a_backend(endpoint: IpAddr) -> Result<(), Refusal> {
    let at = reaches(endpoint);
    if METADATA.contains(&at) || METADATA.contains(&endpoint.to_canonical()) {
        return Err(Refusal::Metadata(endpoint));
    }
    match at {
        IpAddr::V4(v4) => {
            let ip = endpoint.to_canonical();
            // 0.0.0.0/8 is "this network": a source, never a destination.
            if v4.octets()[0] == 0 {
                Err(Refusal::Unspecified(ip))
            } else if v4.is_broadcast() {
                Err(Refusal::Broadcast(ip))
            } else if v4.is_multicast() {
                Err(Refusal::Multicast(ip))
            } else if v4.is_link_local() {
                Err(Refusal::LinkLocal(ip))
            } else if v4.octets()[0] >= 240 {
                Err(Refusal::Reserved(ip))
            } else {
                Ok(())
            }
        }
        IpAddr::V6(v6) => {
            let ip = IpAddr::V6(v6);
            if v6.is_unspecified() {
                Err(Refusal::Unspecified(ip))
            } else if v6.is_multicast() {
                Err(Refusal::Multicast(ip))
            } else if is_link_local_v6(v6) {
                Err(Refusal::LinkLocal(ip))
            } else {
                Ok(())
            }
        }
    }
}

/// fe80::/10 (`Ipv6Addr::is_unicast_link_local` is not stable on our MSRV).
fn is_link_local_v6(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const LOCAL: &str = "127.0.0.1";
    const REMOTE: &str = "10.1.2.3";

    #[test]
    fn never_backend_addresses_are_refused_from_anyone() {
        let open = Admission::default();
        for bad in [
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "::",
            "255.255.255.255",
            "224.0.0.1",
            "239.1.1.1",
            "ff02::1",
            "fe80::1",
            "febf::1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "::a9fe:a9fe",
            "::169.254.169.254",
            "::ffff:0:a9fe:a9fe",
            "64:ff9b::e000:1",
            "240.0.0.1",
            "fd00:ec2::254",
            "100.100.100.200",
            "168.63.129.16",
            "::ffff:0.0.0.0",
            "::ffff:224.0.0.1",
            "::ffff:255.255.255.255",
        ] {
            for sender in [LOCAL, REMOTE] {
                assert!(open.check(ip(bad), ip(sender)).is_err(), "{bad}");
            }
        }
        for good in [
            "10.0.0.1",
            "192.168.1.9",
            "8.8.8.8",
            "fd00::1",
            "2001:db8::1",
        ] {
            assert_eq!(open.check(ip(good), ip(REMOTE)), Ok(()), "{good}");
        }
    }

    #[test]
    fn loopback_only_from_a_loopback_sender() {
        let open = Admission::default();
        for lo in [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "::ffff:127.0.0.1",
            "::7f00:1",
        ] {
            assert_eq!(open.check(ip(lo), ip(LOCAL)), Ok(()), "{lo}");
            assert_eq!(open.check(ip(lo), ip("::1")), Ok(()), "{lo}");
            assert_eq!(open.check(ip(lo), ip("::ffff:127.0.0.1")), Ok(()), "{lo}");
            assert!(matches!(
                open.check(ip(lo), ip(REMOTE)),
                Err(Refusal::RemoteLoopback(_))
            ));
        }
    }

    #[test]
    fn allow_register_narrows_to_the_endpoint_networks() {
        let a = Admission::new(vec![
            "10.0.0.0/8".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ]);
        assert_eq!(a.check(ip("10.200.0.1"), ip("192.168.0.1")), Ok(()));
        assert_eq!(a.check(ip("::ffff:10.0.0.1"), ip(REMOTE)), Ok(()));
        assert_eq!(a.check(ip("fd12::1"), ip(REMOTE)), Ok(()));
        assert_eq!(
            a.check(ip("192.168.0.1"), ip("10.0.0.1")),
            Err(Refusal::NotAllowed(ip("192.168.0.1")))
        );
        // The never-backend rules come first, inside the networks too.
        let all: Admission = Admission::new(vec!["0.0.0.0/0".parse().unwrap()]);
        assert!(matches!(
            all.check(ip("169.254.169.254"), ip(REMOTE)),
            Err(Refusal::LinkLocal(_))
        ));
    }
}
