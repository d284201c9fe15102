//! When to order (pure, time passed in): a certificate's validity read
//! from its DER, renewal when a third of its lifetime is left, and the
//! back-off after failed orders.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest wait after failed orders: a CA that refuses for a day is
/// still asked once a day.
pub const MAX_BACKOFF: Duration = Duration::from_secs(24 * 3600);

/// A certificate's notBefore and notAfter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// The validity of an X.509 certificate in DER; `None` if it is not one.
    pub fn of_der(der: &[u8]) -> Option<Self> {
        let (not_before, not_after) = read_validity(der).ok()?;
        let at = |secs: i64| Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?));
        Some(Self {
            not_before: at(not_before)?,
            not_after: at(not_after)?,
        })
    }

    /// When to renew: a third of the lifetime before the end.
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_after - lifetime / 3
    }
}

/// The wait after the `failures`-th failed order in a row: `first`,
/// doubled each time, at most `MAX_BACKOFF`.
pub fn backoff(first: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    first.saturating_mul(1 << doublings).min(MAX_BACKOFF)
}

/// Seconds since the Unix epoch (0 before it).
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm,
/// signatureValue }; TBSCertificate ::= SEQUENCE { [0] version OPTIONAL,
/// serialNumber, signature, issuer, validity, subject, ... } (RFC 5280).
fn read_validity(der: &[u8]) -> yasna::ASN1Result<(i64, i64)> {
    yasna::parse_der(der, |r| {
        r.read_sequence(|r| {
            let validity = r.next().read_sequence(|r| {
                r.read_optional(|r| r.read_tagged(yasna::Tag::context(0), |r| r.read_der()))?;
                for _ in ["serialNumber", "signature", "issuer"] {
                    r.next().read_der()?;
                }
                let validity = r
                    .next()
                    .read_sequence(|r| Ok((read_time(r.next())?, read_time(r.next())?)))?;
                // subject, subjectPublicKeyInfo, and the optional rest.
                while r.read_optional(|r| r.read_der())?.is_some() {}
                Ok(validity)
            })?;
            r.next().read_der()?;
            r.next().read_der()?;
            Ok(validity)
        })
    })
}

/// Time ::= CHOICE { utcTime, generalTime }, as Unix seconds.
fn read_time(r: yasna::BERReader<'_, '_>) -> yasna::ASN1Result<i64> {
    use yasna::tags::{TAG_GENERALIZEDTIME, TAG_UTCTIME};
    let tag = r.lookahead_tag()?;
    if tag == TAG_UTCTIME {
        Ok(r.read_utctime()?.datetime().unix_timestamp())
    } else if tag == TAG_GENERALIZEDTIME {
        Ok(r.read_generalized_time()?.datetime().unix_timestamp())
    } else {
        Err(yasna::ASN1Error::new(yasna::ASN1ErrorKind::Invalid))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cert(not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["a.test".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn validity_is_read_from_utc_and_generalized_times() {
        // Before 2050 the times are UTCTime, from 2050 GeneralizedTime.
        let v = Validity::of_der(&cert((2025, 1, 1), (2055, 1, 1))).unwrap();
        assert_eq!(unix(v.not_before), 1_735_689_600);
        assert_eq!(unix(v.not_after), 2_682_374_400);
        assert_eq!(Validity::of_der(b"not a certificate"), None);
        assert_eq!(Validity::of_der(&[]), None);
    }

    #[test]
    fn renewal_comes_when_a_third_of_the_lifetime_is_left() {
        let v = Validity::of_der(&cert((2025, 1, 1), (2025, 4, 1))).unwrap();
        // 90 days: renewed 30 days before the end.
        assert_eq!(
            v.not_after.duration_since(v.renew_at()).unwrap(),
            Duration::from_secs(30 * 86_400)
        );
    }

    #[test]
    fn backoff_doubles_up_to_a_day() {
        let m = Duration::from_secs(60);
        assert_eq!(backoff(m, 1), m);
        assert_eq!(backoff(m, 2), m * 2);
        assert_eq!(backoff(m, 5), m * 16);
        assert_eq!(backoff(m, 100), MAX_BACKOFF);
        assert_eq!(backoff(m, 0), m);
    }
}
