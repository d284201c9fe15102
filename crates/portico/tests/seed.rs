//! The seed's own verification session ("What We Verified"), replayed
//! against Portico with the same tools: a python3 backend registered by
//! bash's /dev/udp, curl as the client. Also the CLI's other promises:
//! `portico up`, `register`, `services`, and one-line startup errors.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Python(Child, u16);

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python_backend() -> Python {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/echo_headers.py"
    );
    let mut child = Command::new("python3")
        .arg(script)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    Python(child, line.trim().parse().expect("python backend port"))
}

fn bash(script: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn curl(url: &str) -> String {
    bash(&format!("curl -s --max-time 10 {url}"))
}

#[test]
fn the_seeds_verification_session() {
    let t = tower("30s");
    let port = t.addr.port();
    let ing = ingress(t.addr, &["/api:api-svc", "/:my-server"], &[]);
    let base = format!("http://{}", ing.addr);

    // 503 when no Tower registration exists (correct behavior).
    assert_eq!(curl(&format!("{base}/")), "Service not found in Tower\n");

    // Register a Python HTTP server in the Tower manually.
    let py = python_backend();
    bash(&format!(
        "printf 'REGISTER|my-server|127.0.0.1|{}' > /dev/udp/127.0.0.1/{port}",
        py.1
    ));
    bash(&format!(
        "printf 'REGISTER|api-svc|127.0.0.1|{}' > /dev/udp/127.0.0.1/{port}",
        py.1
    ));
    // The datagram is fire-and-forget: wait until the Tower has it.
    let deadline = Instant::now() + DEADLINE;
    while udp(t.addr, b"LOOKUP|api-svc").starts_with("ERR") {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }

    // Single route, and multi-route prefix matching (/api -> api-svc, / -> my-server).
    assert!(curl(&format!("{base}/")).starts_with("skr8tr ingress works!"));
    assert!(curl(&format!("{base}/api")).starts_with("skr8tr ingress works!"));

    // X-Forwarded-For header injection verified.
    // Header names are case-insensitive (RFC 9110 5.1), as the seed's grep -i.
    let forwarded = bash(&format!(
        "curl -s {base}/ | grep -i -E 'forwarded-for|real-ip'"
    ))
    .to_ascii_lowercase();
    assert!(
        forwarded.contains("x-forwarded-for: 127.0.0.1\n"),
        "{forwarded}"
    );
    assert!(forwarded.contains("x-real-ip: 127.0.0.1\n"), "{forwarded}");
}

#[test]
fn portico_up_is_tower_and_ingress_in_one() {
    let up = up(&["--route", "/:frontend"]);
    let log = up.log_text();
    let tower_addr: std::net::SocketAddr = log
        .split("tower listening on udp ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let base = format!("http://{}", up.addr);
    assert_eq!(curl(&format!("{base}/")), "Service not found in Tower\n");
    let py = python_backend();
    bash(&format!(
        "printf 'REGISTER|frontend|127.0.0.1|{}' > /dev/udp/127.0.0.1/{}",
        py.1,
        tower_addr.port()
    ));
    let deadline = Instant::now() + DEADLINE;
    loop {
        if curl(&format!("{base}/")).starts_with("skr8tr ingress works!") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never routed to the registered backend"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn register_wraps_a_command_and_deregisters_on_exit() {
    let t = tower("30s");
    let port = dead_addr().port().to_string();
    let tower = t.addr.to_string();
    let mut reg = Command::new(env!("CARGO_BIN_EXE_portico"))
        .args([
            "register", "--name", "py", "--port", &port, "--tower", &tower, "--",
        ])
        .args(["python3", "-m", "http.server", &port, "--bind", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let want = format!("OK|LOOKUP|py|127.0.0.1|{port}");
    let deadline = Instant::now() + DEADLINE;
    while udp(t.addr, b"LOOKUP|py") != want {
        assert!(Instant::now() < deadline, "never registered");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Registered only once it listens: the backend answers right away.
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(reg.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(s) = reg.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "register did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    // The command died of the forwarded SIGTERM; register reports 128 + 15.
    assert_eq!(status.code(), Some(143), "{status:?}");
    assert_eq!(udp(t.addr, b"LOOKUP|py"), "ERR|NOT_FOUND|py");
}

#[test]
fn register_exits_with_the_commands_status() {
    let t = tower("30s");
    let tower = t.addr.to_string();
    let status = Command::new(env!("CARGO_BIN_EXE_portico"))
        .args([
            "register", "--name", "x", "--port", "1", "--tower", &tower, "--", "sh", "-c", "exit 3",
        ])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(3));
}

#[test]
fn services_prints_a_table_and_json() {
    let t = tower("30s");
    register(t.addr, "api", "127.0.0.1:8181".parse().unwrap());
    register(t.addr, "api", "[::1]:8182".parse().unwrap());
    let tower = t.addr.to_string();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_portico"))
            .arg("services")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let table = run(&["--tower", &tower]);
    assert!(table.starts_with("SERVICE"), "{table}");
    assert!(
        table.contains("127.0.0.1:8181") && table.contains("[::1]:8182"),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&run(&["--tower", &tower, "--json"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    assert_eq!(json[0]["name"], "api");
    assert_eq!(json[0]["port"], 8181);
}

/// Each mistake gives one line on stderr that says what to do, and exit 1.
#[test]
fn startup_errors_are_one_actionable_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let cases: &[(&[&str], &str)] = &[
        (
            &["ingress", "--listen", &taken_addr, "--route", "/:x"],
            "another process is listening there",
        ),
        (
            &["ingress", "--listen", "127.0.0.1:0", "--route", "/api"],
            "expected [HOST]PREFIX:SERVICE",
        ),
        (
            &[
                "ingress",
                "--listen",
                "127.0.0.1:0",
                "--route",
                "/:x",
                "--tower",
                "no such host.invalid",
            ],
            "cannot resolve the Tower address",
        ),
        (
            &["services", "--tower", &silent_addr],
            "no reply from the Tower",
        ),
        (
            &["ingress", "--listen", "nine", "--route", "/:x"],
            "invalid --listen",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_portico"))
            .args(*args)
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
