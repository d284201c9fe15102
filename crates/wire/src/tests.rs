//! The wire protocol's tests: byte-exact replies, malformed input, LIST cut
//! to one datagram, refusals no longer than the garbage.
#![allow(clippy::unwrap_used)]
use super::*;

fn name(s: &str) -> ServiceName {
    ServiceName::parse(s).unwrap()
}

fn reg(n: &str, addr: &str) -> Registration {
    Registration {
        name: name(n),
        addr: addr.parse().unwrap(),
    }
}

#[test]
fn decodes_the_seed_commands() {
    assert_eq!(
        decode_request(b"REGISTER|my-server|127.0.0.1|8181").unwrap(),
        Request::Register(reg("my-server", "127.0.0.1:8181"))
    );
    assert_eq!(
        decode_request(b"LOOKUP|api-service").unwrap(),
        Request::Lookup(name("api-service"))
    );
    assert_eq!(
        decode_request(b"DEREGISTER|a|10.0.0.1|80").unwrap(),
        Request::Deregister(reg("a", "10.0.0.1:80"))
    );
    assert_eq!(decode_request(b"LIST").unwrap(), Request::List);
    assert_eq!(decode_request(b"PING").unwrap(), Request::Ping);
}

#[test]
fn accepts_ipv6_bare_and_bracketed_and_trailing_newline() {
    let want = Request::Register(reg("a", "[::1]:8080"));
    assert_eq!(decode_request(b"REGISTER|a|::1|8080").unwrap(), want);
    assert_eq!(decode_request(b"REGISTER|a|[::1]|8080\n").unwrap(), want);
    assert_eq!(decode_request(b"PING\r\n").unwrap(), Request::Ping);
}

#[test]
fn malformed_requests_name_their_reply() {
    let cases: &[(&[u8], ErrorReply)] = &[
        (b"", ErrorReply::UnknownCommand),
        (b"HELLO", ErrorReply::UnknownCommand),
        (b"register|a|1.2.3.4|80", ErrorReply::UnknownCommand),
        (b"PING|x", ErrorReply::UnknownCommand),
        (b"LIST|", ErrorReply::UnknownCommand),
        (b"REGISTER", ErrorReply::RegisterSyntax),
        (b"REGISTER|a|1.2.3.4", ErrorReply::RegisterSyntax),
        (b"REGISTER|a|1.2.3.4|80|x", ErrorReply::RegisterSyntax),
        (b"REGISTER|a|1.2.3|80", ErrorReply::RegisterSyntax),
        (b"REGISTER|a|1.2.3.4|0", ErrorReply::RegisterSyntax),
        (b"REGISTER|a|1.2.3.4|65536", ErrorReply::RegisterSyntax),
        (b"REGISTER|a|1.2.3.4|+80", ErrorReply::RegisterSyntax),
        (b"REGISTER|a|1.2.3.4| 80", ErrorReply::RegisterSyntax),
        (b"REGISTER||1.2.3.4|80", ErrorReply::RegisterSyntax),
        (b"REGISTER|a b|1.2.3.4|80", ErrorReply::RegisterSyntax),
        (b"REGISTER|a:b|1.2.3.4|80", ErrorReply::RegisterSyntax),
        (b"REGISTER|a,b|1.2.3.4|80", ErrorReply::RegisterSyntax),
        (b"REGISTER|a|host.example|80", ErrorReply::RegisterSyntax),
        (b"DEREGISTER|a|1.2.3.4", ErrorReply::DeregisterSyntax),
        (b"LOOKUP", ErrorReply::LookupSyntax),
        (b"LOOKUP|", ErrorReply::LookupSyntax),
        (b"LOOKUP|a|b", ErrorReply::LookupSyntax),
        (b"PING\xff", ErrorReply::NotText),
    ];
    for (input, want) in cases {
        let got = decode_request(input).map_err(|e| e.reply());
        assert_eq!(
            got,
            Err(want.clone()),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn name_limits() {
    let ok = "n".repeat(MAX_NAME_LEN);
    assert!(ServiceName::parse(&ok).is_ok());
    let long = "n".repeat(MAX_NAME_LEN + 1);
    assert_eq!(
        ServiceName::parse(&long),
        Err(NameError::TooLong(MAX_NAME_LEN + 1))
    );
    let dgram = format!("REGISTER|{long}|1.2.3.4|80");
    assert_eq!(decode_request(dgram.as_bytes()), Err(DecodeError::Register));
}

#[test]
fn oversized_datagram_is_refused_before_parsing() {
    let big = vec![b'A'; MAX_REQUEST_LEN + 1];
    assert_eq!(
        decode_request(&big),
        Err(DecodeError::TooLong(MAX_REQUEST_LEN + 1))
    );
}

#[test]
fn replies_are_byte_exact() {
    let cases = [
        (Reply::Registered(name("a")), "OK|REGISTERED|a"),
        (Reply::Deregistered(name("a")), "OK|DEREGISTERED|a"),
        (
            Reply::Lookup(reg("a", "127.0.0.1:8181")),
            "OK|LOOKUP|a|127.0.0.1|8181",
        ),
        (Reply::Lookup(reg("a", "[::1]:80")), "OK|LOOKUP|a|::1|80"),
        (Reply::Pong, "OK|PONG|tower"),
        (Reply::List(vec![]), "OK|LIST|0|"),
        (
            Reply::List(vec![
                ListEntry {
                    name: name("a"),
                    addr: "127.0.0.1:1".parse().unwrap(),
                    ttl_left_secs: 29,
                },
                ListEntry {
                    name: name("b"),
                    addr: "[::1]:2".parse().unwrap(),
                    ttl_left_secs: 3,
                },
            ]),
            "OK|LIST|2|a:127.0.0.1:1:29,b:::1:2:3",
        ),
        (
            Reply::Error(ErrorReply::RegisterSyntax),
            "ERR|REGISTER syntax: name|ip|port",
        ),
        (
            Reply::Error(ErrorReply::DeregisterSyntax),
            "ERR|DEREGISTER syntax: name|ip|port",
        ),
        (Reply::Error(ErrorReply::RegistryFull), "ERR|registry full"),
        (
            Reply::Error(ErrorReply::NotFound("x".into())),
            "ERR|NOT_FOUND|x",
        ),
        (
            Reply::Error(ErrorReply::UnknownCommand),
            "ERR|unknown command",
        ),
    ];
    for (reply, want) in cases {
        let bytes = encode_reply(&reply);
        assert_eq!(String::from_utf8(bytes.clone()).unwrap(), want);
        assert_eq!(decode_reply(&bytes).unwrap(), reply, "round trip {want}");
    }
}

#[test]
fn requests_round_trip() {
    for req in [
        Request::Register(reg("a", "127.0.0.1:1")),
        Request::Register(reg("a", "[fe80::1]:65535")),
        Request::Deregister(reg("b", "10.1.2.3:443")),
        Request::Lookup(name("svc")),
        Request::List,
        Request::Ping,
    ] {
        assert_eq!(decode_request(&encode_request(&req)).unwrap(), req);
    }
}

#[test]
fn oversized_list_says_so_instead_of_cutting() {
    let entries: Vec<ListEntry> = (0..2000)
        .map(|i| ListEntry {
            name: name(&"x".repeat(100)),
            addr: SocketAddr::new("10.0.0.1".parse().unwrap(), 1 + i as u16),
            ttl_left_secs: 30,
        })
        .collect();
    let bytes = encode_reply(&Reply::List(entries));
    assert!(bytes.len() <= MAX_REPLY_LEN);
    assert_eq!(
        decode_reply(&bytes).unwrap(),
        Reply::Error(ErrorReply::Other(
            "reply too large for one datagram: 2000 entries; use the HTTP API".into()
        ))
    );
}

fn entries(n: usize) -> Vec<ListEntry> {
    (0..n)
        .map(|i| ListEntry {
            name: name(&format!("svc{i:04}")),
            addr: SocketAddr::new("10.0.0.1".parse().unwrap(), 1 + i as u16),
            ttl_left_secs: 29,
        })
        .collect()
}

#[test]
fn garbage_gets_no_more_bytes_than_it_sent() {
    let refusal = |d: &[u8]| {
        let e = decode_request(d).unwrap_err();
        encode_refusal(&e, d.len()).map(|b| String::from_utf8(b).unwrap())
    };
    assert_eq!(refusal(b""), None);
    assert_eq!(refusal(b"\x01"), None);
    assert_eq!(refusal(b"HELLO").as_deref(), Some("ERR"));
    assert_eq!(refusal(b"\xff\xfe\x00").as_deref(), Some("ERR"));
    assert_eq!(
        refusal(b"HELLO, is this the Tower?").as_deref(),
        Some("ERR|unknown command")
    );
    assert!(refusal(&[b'A'; 600])
        .unwrap()
        .starts_with("ERR|request too long"));
    // A malformed command still gets its syntax, as the seed answered.
    assert_eq!(
        refusal(b"REGISTER").as_deref(),
        Some("ERR|REGISTER syntax: name|ip|port")
    );
    assert_eq!(
        decode_reply(BARE_ERR).unwrap(),
        Reply::Error(ErrorReply::Other(String::new()))
    );
}

#[test]
fn list_within_the_cap_is_whole_and_byte_exact() {
    let small = entries(3);
    assert_eq!(
        encode_list(&small, MAX_UDP_REPLY_LEN),
        encode_reply(&Reply::List(small.clone()))
    );
    assert_eq!(encode_list(&[], MAX_UDP_REPLY_LEN), b"OK|LIST|0|");
}

#[test]
fn long_list_is_cut_with_a_marker_the_parsers_read() {
    let all = entries(1200);
    let bytes = encode_list(&all, MAX_UDP_REPLY_LEN);
    assert!(bytes.len() <= MAX_UDP_REPLY_LEN, "{}", bytes.len());
    let text = String::from_utf8(bytes.clone()).unwrap();
    let fields: Vec<&str> = text.split('|').collect();
    assert_eq!(fields[..2], ["OK", "LIST"]);
    assert_eq!(fields[4..], [TRUNCATED, "1200"]);
    // A seed-style parser (count, then the fourth field split on ',')
    // sees exactly `n` well-formed entries.
    let n: usize = fields[2].parse().unwrap();
    assert!(n > 10 && n < 1200, "{n}");
    assert_eq!(fields[3].split(',').count(), n);
    match decode_reply(&bytes).unwrap() {
        Reply::ListPart { entries, total } => {
            assert_eq!(total, 1200);
            assert_eq!(entries, all[..n]);
        }
        other => panic!("{other:?}"),
    }
    // The next entry would not have fitted.
    let one_more = Reply::ListPart {
        entries: all[..=n].to_vec(),
        total: 1200,
    };
    assert!(encode_reply(&one_more).len() > MAX_UDP_REPLY_LEN);
    assert_eq!(encode_reply(&decode_reply(&bytes).unwrap()), bytes);
}

#[test]
fn signed_writes_keep_their_signature_and_signed_span() {
    let mac = "ab".repeat(32);
    let dgram = format!("REGISTER|api|127.0.0.1|80|1700000000123|{mac}");
    let e = decode_envelope(dgram.as_bytes()).unwrap();
    assert_eq!(e.request, Request::Register(reg("api", "127.0.0.1:80")));
    let sig = e.signature.unwrap();
    assert_eq!(sig.ts_ms, 1_700_000_000_123);
    assert_eq!(sig.mac, [0xab; 32]);
    assert_eq!(
        &dgram.as_bytes()[..e.signed_len],
        b"REGISTER|api|127.0.0.1|80|1700000000123"
    );
    assert_eq!(
        signing_prefix(&e.request, sig.ts_ms),
        b"REGISTER|api|127.0.0.1|80|1700000000123"
    );
    // Unsigned: no signature, the whole datagram is the request.
    let e = decode_envelope(b"DEREGISTER|api|127.0.0.1|80\n").unwrap();
    assert_eq!(e.signature, None);
    assert_eq!(e.signed_len, "DEREGISTER|api|127.0.0.1|80".len());
    assert_eq!(hex(&[0, 0xff, 0x1a]), "00ff1a");
}

#[test]
fn a_signed_list_keeps_its_signature_and_signed_span() {
    let mac = "cd".repeat(32);
    let dgram = format!("LIST|1700000000123|{mac}\n");
    let e = decode_envelope(dgram.as_bytes()).unwrap();
    assert_eq!(e.request, Request::List);
    let sig = e.signature.unwrap();
    assert_eq!(sig.ts_ms, 1_700_000_000_123);
    assert_eq!(sig.mac, [0xcd; 32]);
    assert_eq!(&dgram.as_bytes()[..e.signed_len], b"LIST|1700000000123");
    assert_eq!(
        signing_prefix(&Request::List, sig.ts_ms),
        b"LIST|1700000000123"
    );
    // The seed's LIST is unchanged: unsigned, the whole datagram.
    let e = decode_envelope(b"LIST").unwrap();
    assert_eq!(
        (e.request, e.signature, e.signed_len),
        (Request::List, None, 4)
    );
    // LIST with other fields, or a malformed signature, stays an unknown
    // command: garbage, whose reply is no longer than it.
    for bad in [
        "LIST|1".to_owned(),
        format!("LIST|x1|{mac}"),
        format!("LIST||{mac}"),
        format!("LIST|1|{}", "cd".repeat(31)),
        format!("LIST|1|{mac}|more"),
    ] {
        assert_eq!(
            decode_envelope(bad.as_bytes()),
            Err(DecodeError::UnknownCommand),
            "{bad}"
        );
    }
}

#[test]
fn an_error_within_a_length_is_cut_to_a_bare_err() {
    let e = ErrorReply::Unauthorized("replayed signature".into());
    let full = b"ERR|unauthorized: replayed signature";
    assert_eq!(encode_error_within(&e, full.len()).unwrap(), full);
    assert_eq!(encode_error_within(&e, full.len() - 1).unwrap(), BARE_ERR);
    assert_eq!(encode_error_within(&e, 2), None);
}

#[test]
fn a_whole_list_fits_the_largest_udp_payload() {
    let all = entries(1200);
    assert_eq!(
        encode_list(&all, MAX_UDP_PAYLOAD),
        encode_reply(&Reply::List(all.clone()))
    );
    // Past it, the first entries that fit, marked, as under the safe cap.
    let many = entries(3000);
    let bytes = encode_list(&many, MAX_UDP_PAYLOAD);
    assert!(bytes.len() <= MAX_UDP_PAYLOAD, "{}", bytes.len());
    assert!(matches!(
        decode_reply(&bytes).unwrap(),
        Reply::ListPart { total: 3000, .. }
    ));
}

#[test]
fn malformed_signatures_are_syntax_errors() {
    for bad in [
        "REGISTER|a|1.2.3.4|80|123".to_owned(),
        format!("REGISTER|a|1.2.3.4|80|x1|{}", "ab".repeat(32)),
        format!("REGISTER|a|1.2.3.4|80|1|{}", "ab".repeat(31)),
        format!("REGISTER|a|1.2.3.4|80|1|{}", "zz".repeat(32)),
        format!("REGISTER|a|1.2.3.4|80||{}", "ab".repeat(32)),
    ] {
        assert_eq!(
            decode_envelope(bad.as_bytes()),
            Err(DecodeError::Register),
            "{bad}"
        );
    }
    let e = format!("ERR|{}", ErrorReply::Unauthorized("bad signature".into()));
    assert_eq!(
        decode_reply(e.as_bytes()).unwrap(),
        Reply::Error(ErrorReply::Unauthorized("bad signature".into()))
    );
}

#[test]
fn malformed_replies_are_errors_not_panics() {
    for input in [
        &b""[..],
        b"OK",
        b"OK|LOOKUP|a|1.2.3.4",
        b"OK|LOOKUP|a|1.2.3.4|x",
        b"OK|LIST|2|a:1.2.3.4:1:1",
        b"OK|LIST|x|",
        b"OK|LIST|1|a:1.2.3.4",
        b"OK|LIST|1|a:1.2.3.4:1:1|TRUNCATED|0",
        b"OK|LIST|1|a:1.2.3.4:1:1|TRUNCATED|x",
        b"OK|LIST|1|a:1.2.3.4:1:1|MORE|5",
        b"\xff",
    ] {
        assert!(decode_reply(input).is_err(), "{input:?}");
    }
}
