//! The registry on etcd, end to end: real etcd members (Debian's
//! etcd-server) on loopback, real Towers with `--store etcd`, real ingresses
//! watching a Tower or etcd itself, real backends. No mock of etcd.
#![allow(clippy::unwrap_used)]

mod common;
use common::etcd::{Etcd, Security};
use common::*;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn etcd_tower(etcd: &str, ttl: &str) -> Proc {
    tower_storing_in_etcd(ttl, &["--etcd", etcd])
}

/// A Tower with `--store etcd`, `flags` saying which etcd and how.
fn tower_storing_in_etcd(ttl: &str, flags: &[&str]) -> Proc {
    let mut args = vec![
        "tower",
        "--listen",
        "127.0.0.1:0",
        "--ttl",
        ttl,
        "--store",
        "etcd",
    ];
    args.extend_from_slice(flags);
    Proc::start(&args, "tower listening on udp ")
}

/// An ingress that watches etcd directly.
fn etcd_ingress(etcd: &str, routes: &[&str]) -> Proc {
    ingress(
        dead_addr(),
        routes,
        &["--discovery", "etcd", "--etcd", etcd],
    )
}

async fn wait_logged(p: &Proc, what: &str) {
    let log = p.log.clone();
    eventually(DEADLINE, what, || {
        log.lock().unwrap().iter().any(|l| l.contains(what))
    })
    .await;
}

fn lookup(tower: SocketAddr, name: &str) -> String {
    udp_retrying(tower, format!("LOOKUP|{name}").as_bytes())
}

fn deregister(tower: SocketAddr, name: &str, addr: SocketAddr) {
    assert_eq!(
        udp(
            tower,
            format!("DEREGISTER|{name}|{}|{}", addr.ip(), addr.port()).as_bytes()
        ),
        format!("OK|DEREGISTERED|{name}")
    );
}

/// The endpoints a Tower serves for `name`, from LIST.
fn listed(tower: SocketAddr, name: &str) -> Vec<SocketAddr> {
    let reply = udp_retrying(tower, b"LIST");
    let mut out: Vec<SocketAddr> = reply
        .split('|')
        .skip(3)
        .flat_map(|part| part.split(','))
        .filter_map(|entry| {
            let mut f = entry.split(':');
            let (n, ip, port) = (f.next()?, f.next()?, f.next()?);
            (n == name).then(|| format!("{ip}:{port}").parse().ok())?
        })
        .collect();
    out.sort();
    out
}

/// Wait until `tower` serves exactly `want` for `name`.
async fn wait_listed(tower: SocketAddr, name: &str, want: &[SocketAddr]) {
    wait_listed_checking(tower, name, want, || {}).await;
}

/// `wait_listed`, running `check` (which asserts something that must hold
/// all along) before each look.
async fn wait_listed_checking(
    tower: SocketAddr,
    name: &str,
    want: &[SocketAddr],
    mut check: impl FnMut(),
) {
    let mut want = want.to_vec();
    want.sort();
    let what = format!("tower {tower}'s list of {name}");
    wait_for_value(&what, &want, Duration::from_millis(10), || {
        check();
        std::future::ready(listed(tower, name))
    })
    .await;
}

/// Send requests until the ones answered come from exactly `ids` (20 in a
/// row cover them all and nothing else).
async fn wait_routed(ingress: SocketAddr, ids: &[&str]) {
    let deadline = Instant::now() + DEADLINE;
    let mut client = Client::connect(ingress).await;
    loop {
        let mut seen = std::collections::BTreeSet::new();
        let mut failed = 0;
        for _ in 0..20 {
            let a = client.get("/").await;
            match a.headers.get("x-backend") {
                Some(id) if a.status == 200 => {
                    seen.insert(id.to_str().unwrap().to_owned());
                }
                _ => failed += 1,
            }
        }
        let want: std::collections::BTreeSet<String> =
            ids.iter().map(|s| (*s).to_owned()).collect();
        if seen == want && (failed == 0 || ids.is_empty()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ingress {ingress} routes to {seen:?} ({failed} failed of 20), want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn readyz(addr: SocketAddr) -> u16 {
    get(addr, "/readyz").await.status
}

/// Wait until `/readyz` at `addr` answers `want`.
async fn wait_ready(addr: SocketAddr, want: u16) {
    let what = format!("{addr}/readyz");
    wait_for_value(&what, &want, Duration::from_millis(20), || readyz(addr)).await;
}

#[tokio::test]
async fn a_replica_registered_on_one_tower_is_served_and_routed_everywhere() {
    let etcd = Etcd::start(1);
    let eps = etcd.endpoints();
    let a = etcd_tower(&eps, "30s");
    let b = etcd_tower(&eps, "30s");
    let x = Backend::start("x").await;
    register(a.addr, "web", x.addr);

    // Tower B knows it through etcd, and answers LOOKUP with it.
    wait_listed(b.addr, "web", &[x.addr]).await;
    assert_eq!(
        lookup(b.addr, "web"),
        format!("OK|LOOKUP|web|127.0.0.1|{}", x.addr.port())
    );
    // The key layout the README documents, bound to a lease.
    assert_eq!(
        etcd.keys("/portico/v1/services/"),
        [format!("/portico/v1/services/web/{}", x.addr)]
    );

    // An ingress watching Tower B routes to it, and so does one watching etcd.
    let via_b = ingress(b.addr, &["/:web"], &[]);
    let via_etcd = etcd_ingress(&eps, &["/:web"]);
    wait_routed(via_b.addr, &["x"]).await;
    wait_routed(via_etcd.addr, &["x"]).await;
    assert_eq!(readyz(b.addr).await, 200);
    assert_eq!(
        readyz(via_etcd.logged_addr("admin listening on ")).await,
        200
    );

    // A DEREGISTER at B removes what A registered, everywhere.
    deregister(b.addr, "web", x.addr);
    wait_listed(a.addr, "web", &[]).await;
    wait_routed(via_etcd.addr, &[]).await;
    wait_routed(via_b.addr, &[]).await;
    assert!(etcd.keys("/portico/v1/services/").is_empty());
}

#[tokio::test]
async fn a_killed_tower_lets_its_registrations_expire_by_lease() {
    let etcd = Etcd::start(1);
    let eps = etcd.endpoints();
    let mut a = etcd_tower(&eps, "2s");
    let b = etcd_tower(&eps, "2s");
    let x = Backend::start("x").await;
    let y = Backend::start("y").await;
    register(a.addr, "web", x.addr);
    register(b.addr, "web", y.addr);
    wait_listed(b.addr, "web", &[x.addr, y.addr]).await;

    // No DEREGISTER: Tower A dies, and x's workload with it.
    a.signal(nix::sys::signal::Signal::SIGKILL);
    a.wait_exit(DEADLINE);
    let killed = Instant::now();
    // y is kept alive at B by its heartbeats; x only by A's lease.
    let heartbeat = {
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, tower, addr) = (stop.clone(), b.addr, y.addr);
        let h = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                register(tower, "web", addr);
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        (stop, h)
    };
    wait_listed(b.addr, "web", &[y.addr]).await;
    println!(
        "x gone from Tower B {:?} after Tower A died",
        killed.elapsed()
    );
    assert!(!etcd
        .keys("/portico/v1/services/")
        .contains(&format!("/portico/v1/services/web/{}", x.addr)));
    heartbeat.0.store(true, Ordering::SeqCst);
    heartbeat.1.join().unwrap();
}

#[tokio::test]
async fn an_etcd_restart_loses_no_registration_and_brings_back_no_stale_one() {
    let mut etcd = Etcd::start(1);
    let eps = etcd.endpoints();
    let a = etcd_tower(&eps, "30s");
    let b = etcd_tower(&eps, "30s");
    let (x, y, z) = (
        Backend::start("x").await,
        Backend::start("y").await,
        Backend::start("z").await,
    );
    register(a.addr, "web", x.addr);
    register(a.addr, "web", y.addr);
    let via_etcd = etcd_ingress(&eps, &["/:web"]);
    let via_b = ingress(b.addr, &["/:web"], &[]);
    let admin = via_etcd.logged_addr("admin listening on ");
    wait_routed(via_etcd.addr, &["x", "y"]).await;
    wait_routed(via_b.addr, &["x", "y"]).await;

    etcd.kill(0);
    // Everyone keeps serving the last known endpoints, and says it is not
    // ready.
    wait_ready(admin, 503).await;
    wait_ready(b.addr, 503).await;
    wait_routed(via_etcd.addr, &["x", "y"]).await;
    wait_routed(via_b.addr, &["x", "y"]).await;
    // Changes while etcd is down are served at once by the Tower that
    // received them.
    deregister(a.addr, "web", y.addr);
    register(a.addr, "web", z.addr);
    wait_listed(a.addr, "web", &[x.addr, z.addr]).await;

    etcd.restart(0);
    // On return: the deregistered replica stays gone, the new one arrives,
    // and the one registered before the outage survived it. Tower A writes
    // the delete while its watch may still be backing off: its stale copy
    // must not bring y back meanwhile.
    wait_listed_checking(b.addr, "web", &[x.addr, z.addr], || {
        assert!(
            !listed(a.addr, "web").contains(&y.addr),
            "Tower A serves the deregistered replica again"
        );
    })
    .await;
    wait_routed(via_etcd.addr, &["x", "z"]).await;
    wait_routed(via_b.addr, &["x", "z"]).await;
    let mut keys = etcd.keys("/portico/v1/services/");
    keys.sort();
    let mut want = vec![
        format!("/portico/v1/services/web/{}", x.addr),
        format!("/portico/v1/services/web/{}", z.addr),
    ];
    want.sort();
    assert_eq!(keys, want);
    wait_ready(admin, 200).await;
    wait_ready(b.addr, 200).await;
    // Nothing stale comes back later either (a re-list, a resumed watch).
    wait_routed(via_etcd.addr, &["x", "z"]).await;
    assert_eq!(listed(a.addr, "web"), {
        let mut v = vec![x.addr, z.addr];
        v.sort();
        v
    });
}

/// A watch that resumes past etcd's compaction lists everything again.
/// Tower B talks to one member only; while that member is down, Tower A
/// registers through another and the history is compacted away.
#[tokio::test]
async fn a_watch_resuming_past_a_compaction_lists_again() {
    let mut etcd = Etcd::start(3);
    let m0 = format!("http://{}", etcd.members[0].client);
    let m1 = format!("http://{}", etcd.members[1].client);
    let a = etcd_tower(&m1, "30s");
    let b = etcd_tower(&m0, "30s");
    let x = Backend::start("x").await;
    let y = Backend::start("y").await;
    register(a.addr, "web", x.addr);
    wait_listed(b.addr, "web", &[x.addr]).await;

    etcd.kill(0);
    wait_ready(b.addr, 503).await;
    register(a.addr, "web", y.addr);
    deregister(a.addr, "web", x.addr);
    wait_listed(a.addr, "web", &[y.addr]).await;
    let member1 = etcd.members[1].client;
    let revision = loop {
        // Once A's writes are in etcd, compact all history up to now.
        if etcd.keys("/portico/v1/services/") == [format!("/portico/v1/services/web/{}", y.addr)] {
            let (_, status) =
                common::etcd::post(member1, "/v3/kv/range", r#"{"key":"AA=="}"#).unwrap();
            let v: serde_json::Value = serde_json::from_str(&status).unwrap();
            break v["header"]["revision"].as_str().unwrap().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (code, _) = common::etcd::post(
        member1,
        "/v3/kv/compaction",
        &format!(r#"{{"revision":"{revision}","physical":true}}"#),
    )
    .unwrap();
    assert_eq!(code, 200);

    etcd.restart(0);
    wait_listed(b.addr, "web", &[y.addr]).await;
    wait_ready(b.addr, 200).await;
    assert!(
        b.log_text()
            .contains("compacted past the last revision seen"),
        "{}",
        b.log_text()
    );
}

/// A member that hangs (SIGSTOP: connections open, nothing answered) is
/// what a partition looks like from outside: the watch just goes quiet.
/// The probe notices, readiness drops, routing goes on, and all resumes
/// when it answers again.
#[tokio::test]
async fn a_hung_etcd_is_noticed_and_routing_goes_on() {
    let etcd = Etcd::start(1);
    let eps = etcd.endpoints();
    let a = etcd_tower(&eps, "30s");
    let x = Backend::start("x").await;
    let y = Backend::start("y").await;
    register(a.addr, "web", x.addr);
    let via_etcd = etcd_ingress(&eps, &["/:web"]);
    let admin = via_etcd.logged_addr("admin listening on ");
    wait_routed(via_etcd.addr, &["x"]).await;

    let pid = etcd.members[0].pid();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    wait_ready(admin, 503).await;
    wait_ready(a.addr, 503).await;
    wait_routed(via_etcd.addr, &["x"]).await;
    register(a.addr, "web", y.addr);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    wait_ready(admin, 200).await;
    wait_routed(via_etcd.addr, &["x", "y"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_cluster_losing_its_leader_keeps_registering_and_routing() {
    let mut etcd = Etcd::start(3);
    let eps = etcd.endpoints();
    let a = etcd_tower(&eps, "30s");
    // B lists the members in another order, so the two use different ones.
    let reversed: Vec<&str> = eps.split(',').rev().collect();
    let b = etcd_tower(&reversed.join(","), "30s");
    let x = Backend::start("x").await;
    let y = Backend::start("y").await;
    register(a.addr, "web", x.addr);
    let via_etcd = etcd_ingress(&eps, &["/:web"]);
    let via_b = ingress(b.addr, &["/:web"], &[]);
    wait_routed(via_etcd.addr, &["x"]).await;
    wait_routed(via_b.addr, &["x"]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (stats, tasks) = spawn_load(via_etcd.addr, 4, 1, stop.clone());
    let leader = etcd.leader();
    etcd.kill(leader);
    let killed = Instant::now();

    register(b.addr, "web", y.addr);
    wait_listed(a.addr, "web", &[x.addr, y.addr]).await;
    println!(
        "leader killed; a registration at B reached A {:?} later",
        killed.elapsed()
    );
    wait_routed(via_b.addr, &["x", "y"]).await;
    deregister(a.addr, "web", x.addr);
    wait_listed(b.addr, "web", &[y.addr]).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, non_2xx, errors) = stats.summary();
    println!("load through the leader loss: ok={ok} non_2xx={non_2xx} socket_errors={errors}");
    assert!(ok > 0);
    assert_eq!((non_2xx, errors), (0, 0));
    wait_routed(via_etcd.addr, &["y"]).await;
    assert_ne!(etcd.leader(), leader, "a new leader was elected");
}

/// Register-to-routed delay, 100 registrations each: through etcd (to an
/// ingress watching etcd, and to one watching another Tower) and through
/// the in-memory Tower, in the same run. Prints the figures; asserts only
/// that every registration was routed.
#[tokio::test]
async fn register_to_routed_delay_through_etcd_and_in_memory() {
    let etcd = Etcd::start(1);
    let eps = etcd.endpoints();
    let a = etcd_tower(&eps, "30s");
    let b = etcd_tower(&eps, "30s");
    let mem = tower("30s");
    let x = Backend::start("x").await;
    let via_etcd = etcd_ingress(&eps, &["/:web"]);
    let via_b = ingress(b.addr, &["/:web"], &[]);
    let via_mem = ingress(mem.addr, &["/:web"], &[]);
    wait_logged(&via_etcd, "in sync with etcd").await;
    wait_synced(&via_b, 1).await;
    wait_synced(&via_mem, 1).await;
    for (label, tower, ing) in [
        ("etcd, ingress watching etcd", a.addr, via_etcd.addr),
        ("etcd, ingress watching another Tower", a.addr, via_b.addr),
        ("in-memory Tower", mem.addr, via_mem.addr),
    ] {
        let mut client = Client::connect(ing).await;
        let mut delays = Vec::new();
        for _ in 0..100 {
            let sent = Instant::now();
            register(tower, "web", x.addr);
            loop {
                if client.get("/").await.status == 200 {
                    break;
                }
                assert!(sent.elapsed() < DEADLINE, "{label}: never routed");
            }
            delays.push(sent.elapsed());
            deregister(tower, "web", x.addr);
            let gone = Instant::now();
            while client.get("/").await.status == 200 {
                assert!(gone.elapsed() < DEADLINE, "{label}: never unrouted");
            }
        }
        delays.sort();
        println!(
            "register -> routed, {label}: median {:?}, p90 {:?}, worst {:?} (n={})",
            delays[delays.len() / 2],
            delays[delays.len() * 9 / 10],
            delays[delays.len() - 1],
            delays.len()
        );
    }
}

/// A Tower storing in `etcd`, with its TLS files and user when it has them.
fn tower_on(etcd: &Etcd, ttl: &str) -> Proc {
    let flags = etcd.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    tower_storing_in_etcd(ttl, &flags)
}

/// An ingress watching `etcd`, with its TLS files and user.
fn ingress_on(etcd: &Etcd, routes: &[&str]) -> Proc {
    let flags = etcd.flags();
    let mut extra = vec!["--discovery", "etcd"];
    extra.extend(flags.iter().map(String::as_str));
    ingress(dead_addr(), routes, &extra)
}

/// Wait until etcd holds exactly `want` under the services prefix.
async fn wait_keys(etcd: &Etcd, want: &[String]) {
    let mut want = want.to_vec();
    want.sort();
    wait_for_value("what etcd holds", &want, Duration::from_millis(20), || {
        let mut got = etcd.keys("/portico/v1/services/");
        got.sort();
        std::future::ready(got)
    })
    .await;
}

/// Run `portico ARGS` until it has said `what` (or stopped): its exit code
/// if it stopped, and what it wrote to stderr. A misconfiguration stops the
/// start when etcd answers the start's check in time; on a machine too
/// loaded for that, the loops log the same words instead.
fn run_until_said(args: &[String], what: &str) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portico"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let said = Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let said = said.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut said = said.lock().unwrap();
                said.push_str(&line);
                said.push('\n');
            }
        })
    };
    let deadline = Instant::now() + DEADLINE;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if said.lock().unwrap().contains(what) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "portico {args:?} did not say {what:?}: {}",
                said.lock().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    reader.join().unwrap();
    let text = said.lock().unwrap().clone();
    (code, text)
}

/// etcd as run in production: TLS with client certificates, a user with a
/// password allowed only Portico's prefix. A Tower writes there and an
/// ingress watching etcd routes to what it wrote, through an etcd restart.
#[tokio::test]
async fn a_tower_and_an_ingress_use_etcd_over_tls_with_a_client_certificate_and_a_password() {
    let mut etcd = Etcd::start_secure(Security::default());
    let a = tower_on(&etcd, "30s");
    let x = Backend::start("x").await;
    register(a.addr, "web", x.addr);
    wait_keys(&etcd, &[format!("/portico/v1/services/web/{}", x.addr)]).await;

    let via_etcd = ingress_on(&etcd, &["/:web"]);
    let admin = via_etcd.logged_addr("admin listening on ");
    wait_routed(via_etcd.addr, &["x"]).await;
    wait_ready(admin, 200).await;

    // Both come back to an etcd that restarted (new connections, new
    // handshakes, tokens that may not have survived).
    etcd.restart(0);
    let y = Backend::start("y").await;
    register(a.addr, "web", y.addr);
    wait_routed(via_etcd.addr, &["x", "y"]).await;
    wait_ready(admin, 200).await;
    wait_ready(a.addr, 200).await;

    let password = &etcd.secure().password;
    for p in [&a, &via_etcd] {
        assert!(
            !p.log_text().contains(password.as_str()),
            "{}",
            p.log_text()
        );
    }
}

/// Each flag that is wrong stops the start with one line that says which
/// flag (or, when etcd is too slow to answer the start's check, the same
/// words are logged), and never shows the password.
#[tokio::test]
async fn wrong_etcd_credentials_or_tls_files_stop_the_start_saying_what_to_fix() {
    let etcd = Etcd::start_secure(Security::default());
    let s = etcd.secure();
    let wrong_password = s.dir().join("wrong.password");
    std::fs::write(&wrong_password, "not-the-password\n").unwrap();
    let other_ca = common::etcd::make_ca(s.dir(), "other-ca").0;
    let other_ca = other_ca.to_str().unwrap();
    let with = |cmd: &[&str], replace: &[(&str, Option<&str>)]| -> Vec<String> {
        let mut args: Vec<String> = cmd.iter().map(|a| (*a).to_owned()).collect();
        let flags = etcd.flags();
        for pair in flags.chunks(2) {
            match replace.iter().find(|(f, _)| *f == pair[0]) {
                Some((_, None)) => {}
                Some((f, Some(v))) => args.extend([(*f).to_owned(), (*v).to_owned()]),
                None => args.extend(pair.iter().cloned()),
            }
        }
        args
    };
    let tower = ["tower", "--listen", "127.0.0.1:0", "--store", "etcd"];
    let ingress = [
        "ingress",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--route",
        "/:web",
        "--discovery",
        "etcd",
    ];
    let wrong_pw = wrong_password.to_str().unwrap();
    let cases = [
        (
            with(&tower, &[("--etcd-password-file", Some(wrong_pw))]),
            "refused the user 'portico': wrong user or password; check --etcd-user and the password in --etcd-password-file",
        ),
        (
            with(&ingress, &[("--etcd-password-file", Some(wrong_pw))]),
            "refused the user 'portico'",
        ),
        (
            with(&ingress, &[("--etcd-ca-cert", Some(other_ca))]),
            "is not signed by the CA in --etcd-ca-cert",
        ),
        (
            with(&tower, &[("--etcd-cert", None), ("--etcd-key", None)]),
            "etcd refused our client certificate; pass --etcd-cert and --etcd-key",
        ),
        (
            with(&tower, &[("--etcd-password-file", Some("/nonexistent/etcd.password"))]),
            "cannot read --etcd-password-file /nonexistent/etcd.password",
        ),
        (
            with(&tower, &[("--etcd-password-file", None), ("--etcd-user", None)]),
            "requires authentication; pass --etcd-user",
        ),
        (
            with(&tower, &[("--etcd-ca-cert", None)]),
            "https:// members need --etcd-ca-cert",
        ),
    ];
    for (args, want) in cases {
        let started = Instant::now();
        let (code, stderr) = run_until_said(&args, want);
        println!(
            "{:?} ({:?}): {}",
            started.elapsed(),
            code,
            stderr.trim_end()
        );
        assert!(
            stderr.contains(want),
            "{args:?} should say {want:?}: {stderr}"
        );
        if let Some(code) = code {
            assert_eq!(code, 1, "{args:?}: {stderr}");
        }
        assert!(!stderr.contains("not-the-password"), "{stderr}");
        assert!(!stderr.contains(&s.password), "{stderr}");
    }
}

/// etcd's tokens expire (JWT tokens, here after 2 s, whatever their use):
/// a Tower and an ingress that have used theirs past that keep writing,
/// watching and routing, on new tokens; also when the first call after
/// the expiry opens a watch (etcd cancels the watch rather than failing
/// the call).
#[tokio::test]
async fn etcd_tokens_that_expire_are_renewed_and_registration_and_routing_go_on() {
    let mut etcd = Etcd::start_secure(Security {
        jwt_ttl: Some("2s"),
    });
    let a = tower_on(&etcd, "30s");
    let via_etcd = ingress_on(&etcd, &["/:web"]);
    let admin = via_etcd.logged_addr("admin listening on ");
    let x = Backend::start("x").await;
    register(a.addr, "web", x.addr);
    wait_routed(via_etcd.addr, &["x"]).await;

    // Every token issued so far has expired once a token issued now has:
    // etcd refuses it.
    let s = etcd.secure();
    let probe = etcd.authenticate(common::etcd::USER, &s.password).unwrap();
    let issued = Instant::now();
    let member = etcd.members[0].client;
    let range = r#"{"key":"L3BvcnRpY28vdjEv","range_end":"L3BvcnRpY28vdjEw"}"#;
    assert_eq!(
        etcd.curl(member, "/v3/kv/range", range, Some(&probe))
            .unwrap()
            .0,
        200
    );
    while issued.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = etcd
        .curl(member, "/v3/kv/range", range, Some(&probe))
        .unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("invalid auth token"), "{body}");

    // Writes (lease, put), the Tower's watch and the ingress's watch all
    // go on.
    let y = Backend::start("y").await;
    register(a.addr, "web", y.addr);
    wait_keys(
        &etcd,
        &[
            format!("/portico/v1/services/web/{}", x.addr),
            format!("/portico/v1/services/web/{}", y.addr),
        ],
    )
    .await;
    wait_listed(a.addr, "web", &[x.addr, y.addr]).await;
    wait_routed(via_etcd.addr, &["x", "y"]).await;
    wait_ready(admin, 200).await;
    wait_ready(a.addr, 200).await;
    // Without an outage: a refused token is replaced within the call, so
    // no watch was dropped (a probe refused twice in a row would).
    for p in [&a, &via_etcd] {
        let log = p.log_text();
        assert!(!log.contains("lost etcd"), "{log}");
    }

    // etcd away for longer than a token lasts: on its return the first
    // call each makes is to watch again, with a token that has expired.
    etcd.kill(0);
    let killed = Instant::now();
    while killed.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    etcd.restart(0);
    let z = Backend::start("z").await;
    register(a.addr, "web", z.addr);
    wait_routed(via_etcd.addr, &["x", "y", "z"]).await;
    wait_ready(admin, 200).await;
    wait_ready(a.addr, 200).await;
}

/// etcd holds what any Tower, or anyone with write access, put there: a
/// Tower serves only what its own REGISTER rules accept, and an ingress
/// watching etcd never routes to an endpoint that is never a backend.
#[tokio::test]
async fn endpoints_written_to_etcd_by_hand_obey_the_register_rules() {
    use base64::Engine;
    let etcd = Etcd::start(1);
    let eps = etcd.endpoints();
    let tower = etcd_tower(&eps, "30s");
    let via_etcd = etcd_ingress(&eps, &["/:web"]);
    let x = Backend::start("x").await;
    register(tower.addr, "web", x.addr);
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    for bad in ["169.254.169.254:80", "[fe80::1]:80", "224.0.0.1:80"] {
        let put = format!(
            r#"{{"key":"{}","value":"{}"}}"#,
            b64(&format!("/portico/v1/services/web/{bad}")),
            b64("{}")
        );
        let (code, body) = common::etcd::post(etcd.members[0].client, "/v3/kv/put", &put).unwrap();
        assert_eq!(code, 200, "{body}");
    }
    // A registration after them: once it is seen, so were they.
    let y = Backend::start("y").await;
    register(tower.addr, "web", y.addr);
    // The Tower's table, and so its LOOKUP, LIST and watchers: x and y.
    wait_listed(tower.addr, "web", &[x.addr, y.addr]).await;
    // The ingress on etcd: the same two, and none of the others.
    let admin = via_etcd.logged_addr("admin listening on ");
    let y_port = format!("{}", y.addr.port());
    wait_for_value(
        "the etcd ingress's endpoints naming y",
        &true,
        Duration::from_millis(20),
        || {
            let y_port = y_port.clone();
            async move { get(admin, "/endpoints").await.body.contains(&y_port) }
        },
    )
    .await;
    let listed = get(admin, "/endpoints").await.body;
    for bad in ["169.254.169.254", "fe80::1", "224.0.0.1"] {
        assert!(!listed.contains(bad), "{bad} in {listed}");
    }
    wait_routed(via_etcd.addr, &["x", "y"]).await;
}
