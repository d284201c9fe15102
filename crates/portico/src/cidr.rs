//! A network given as ADDR/PREFIX, and whether an address lies in it.
//! Shared by the Tower (`--allow-register`, `--udp-rate-exempt`) and the
//! data plane (`--proxy-protocol-from`), so neither imports the other. Pure.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A network: an address and a prefix length (`10.0.0.0/8`, `fd00::/8`, or
/// a bare address for one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an address or ADDR/PREFIX (e.g. 10.0.0.0/8, fd00::/8)")]
    Syntax(String),
    #[error("prefix /{prefix} is longer than the address ({max} bits)")]
    Prefix { prefix: u8, max: u8 },
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || CidrError::Syntax(s.to_owned());
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = ip.parse().map_err(|_| syntax())?;
        let net = net.to_canonical();
        let max = bits(net);
        let prefix = match prefix {
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse().map_err(|_| syntax())?
            }
            Some(_) => return Err(syntax()),
            None => max,
        };
        if prefix > max {
            return Err(CidrError::Prefix { prefix, max });
        }
        Ok(Self { net, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

fn bits(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// The address as a 128-bit number with its width, IPv4-mapped IPv6 taken
/// as the IPv4 address it carries.
fn as_bits(ip: IpAddr) -> (u128, u8) {
    match ip.to_canonical() {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, width) = as_bits(self.net);
        let (ip, ip_width) = as_bits(ip);
        if width != ip_width {
            return false;
        }
        let host_bits = u32::from(width - self.prefix);
        let mask = u128::MAX.checked_shl(host_bits).unwrap_or(0);
        net & mask == ip & mask
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_forms() {
        let c: Cidr = "10.1.2.3".parse().unwrap();
        assert_eq!(c.to_string(), "10.1.2.3/32");
        assert!(c.contains(ip("10.1.2.3")) && !c.contains(ip("10.1.2.4")));
        let all6: Cidr = "::/0".parse().unwrap();
        assert!(all6.contains(ip("2001:db8::1")) && !all6.contains(ip("10.0.0.1")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0.0/".parse::<Cidr>().is_err());
        assert!("10.0.0.0/+8".parse::<Cidr>().is_err());
        assert!("ten/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn ipv4_mapped_addresses_are_their_ipv4_address() {
        let c: Cidr = "127.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("::ffff:127.0.0.2")));
        assert!(!c.contains(ip("::1")));
    }
}
