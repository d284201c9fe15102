//! A real etcd (Debian's etcd-server) on loopback for tests: one member or a
//! cluster, on free ports below the ephemeral range (a restarted member
//! must get its ports back), with a temporary data directory.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::DEADLINE;

pub struct Member {
    pub name: String,
    pub client: SocketAddr,
    pub peer: SocketAddr,
    child: Option<Child>,
}

impl Member {
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }
}

pub struct Etcd {
    pub members: Vec<Member>,
    dir: PathBuf,
    cluster: String,
    token: String,
}

/// A free TCP port in 30000-32700, below Linux's ephemeral range.
fn free_port(taken: &[SocketAddr]) -> SocketAddr {
    for _ in 0..1000 {
        let port = 30_000 + fastrand::u16(..2_700);
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        if taken.contains(&addr) {
            continue;
        }
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free port in 30000-32700");
}

/// One HTTP/1.1 POST, the status and body; `None` if there is no answer.
pub fn post(addr: SocketAddr, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

impl Etcd {
    /// Start `n` members and wait until the cluster answers linearizable
    /// reads.
    pub fn start(n: usize) -> Etcd {
        assert!(
            Command::new("etcd").arg("--version").output().is_ok(),
            "these tests need etcd: apt-get install etcd-server (.ci/run does)"
        );
        let dir = std::env::temp_dir().join(format!(
            "portico-etcd-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut taken = Vec::new();
        let mut members = Vec::new();
        for i in 0..n {
            let client = free_port(&taken);
            taken.push(client);
            let peer = free_port(&taken);
            taken.push(peer);
            members.push(Member {
                name: format!("m{i}"),
                client,
                peer,
                child: None,
            });
        }
        let cluster = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd {
            members,
            dir,
            cluster,
            token: format!("portico-test-{}", fastrand::u64(..)),
        };
        for i in 0..n {
            etcd.spawn(i);
        }
        etcd.wait_ready();
        etcd
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let data = self.dir.join(&m.name);
        let log = std::fs::File::create(self.dir.join(format!("{}.log", m.name))).unwrap();
        let child = Command::new("etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &format!("http://{}", m.client)])
            .args(["--advertise-client-urls", &format!("http://{}", m.client)])
            .args(["--listen-peer-urls", &format!("http://{}", m.peer)])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://{}", m.peer),
            ])
            .args(["--initial-cluster", &self.cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            // Quick elections keep the leader-loss test short.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.members[i].child = Some(child);
    }

    /// Every member's client URL, comma-separated (for --etcd).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("http://{}", m.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Wait until a live member answers a linearizable read.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            for m in self.members.iter().filter(|m| m.child.is_some()) {
                if let Some((200, _)) = post(m.client, "/v3/kv/range", r#"{"key":"AA=="}"#) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become ready; logs in {}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start member `i` again on its ports and data.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_ready();
    }

    /// The index of the member that is leader now.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + DEADLINE;
        loop {
            for (i, m) in self.members.iter().enumerate() {
                if m.child.is_none() {
                    continue;
                }
                let Some((200, body)) = post(m.client, "/v3/maintenance/status", "{}") else {
                    continue;
                };
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                let (Some(leader), Some(me)) =
                    (v["leader"].as_str(), v["header"]["member_id"].as_str())
                else {
                    continue;
                };
                if leader == me {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no etcd leader");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every key under `prefix` as text, from a live member.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let body = format!(
            r#"{{"key":"{}","range_end":"{}"}}"#,
            b64.encode(prefix),
            b64.encode(&end)
        );
        // Right after a member is killed the others may be electing a
        // leader, and refuse linearizable reads until they have one.
        let deadline = Instant::now() + DEADLINE;
        loop {
            for m in self.members.iter().filter(|m| m.child.is_some()) {
                if let Some((200, out)) = post(m.client, "/v3/kv/range", &body) {
                    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
                    return v["kvs"]
                        .as_array()
                        .map(|kvs| {
                            kvs.iter()
                                .map(|kv| {
                                    let k = b64.decode(kv["key"].as_str().unwrap()).unwrap();
                                    String::from_utf8(k).unwrap()
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                }
            }
            assert!(Instant::now() < deadline, "no etcd member answered");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
