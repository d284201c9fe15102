//! Path normalisation and route matching: no panic; normal form is stable
//! and free of dot segments and empty segments; the fast check agrees;
//! `--path-escapes reject` refuses whatever `keep-encoded` does.
#![no_main]
use libfuzzer_sys::fuzz_target;
use portico::ingress::route::{
    ambiguous_path, is_normal, normalise_path, PathEscapes, RouteTable,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (spec, path) = text.split_once('\n').unwrap_or(("/api:api", text));
    assert_eq!(ambiguous_path(path, PathEscapes::Keep), None);
    if ambiguous_path(path, PathEscapes::KeepEncoded).is_some() {
        assert!(ambiguous_path(path, PathEscapes::Reject).is_some(), "{path}");
    }
    if let Some(n) = normalise_path(path) {
        assert!(n.starts_with('/'));
        assert!(!n.contains("//"), "{n}");
        assert!(!n.split('/').any(|s| s == "." || s == ".."), "{n}");
        assert_eq!(
            normalise_path(&n).as_deref(),
            Some(n.as_str()),
            "normal form is stable"
        );
        if is_normal(path) {
            assert_eq!(n, path, "a path that claims to be normal is");
        }
        let specs: Vec<&str> = spec.split(' ').collect();
        if let Ok(table) = RouteTable::parse(&specs) {
            if let Some(route) = table.find(None, &n) {
                assert!(
                    route.prefix == "/"
                        || n == route.prefix
                        || n.starts_with(&format!("{}/", route.prefix))
                );
            }
        }
    }
});
