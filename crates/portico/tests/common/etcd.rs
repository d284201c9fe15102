//! A real etcd (Debian's etcd-server) on loopback for tests: one member or a
//! cluster, on free ports below the ephemeral range (a restarted member
//! must get its ports back), with a temporary data directory. Optionally
//! secured as in production: TLS with client certificates (made here with
//! openssl) and users with passwords.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
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
    secure: Option<Secure>,
}

/// How a test etcd is secured.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// Give JWT tokens that expire this long (e.g. "2s") after they were
    /// issued. etcd's default, simple tokens, last while they are used (each
    /// use restarts --auth-token-ttl), so a client that keeps calling never
    /// sees one expire; they are lost when etcd restarts.
    pub jwt_ttl: Option<&'static str>,
}

/// The files and users of a secured etcd.
pub struct Secure {
    pub ca: PathBuf,
    server: (PathBuf, PathBuf),
    /// Portico's client certificate and key. No CommonName: etcd's gateway
    /// refuses a client certificate with one once auth is on.
    pub client: (PathBuf, PathBuf),
    /// The password of the user `portico`, and a file holding it.
    pub password: String,
    pub password_file: PathBuf,
    root_password: String,
    auth_token: Option<String>,
    auth_on: bool,
}

pub const USER: &str = "portico";

/// Run openssl with `args` (split at spaces: test paths have none); panics
/// with its complaint when it fails.
pub fn openssl(args: &str) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A CA (P-256) in `dir`: its certificate and key.
pub fn make_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    openssl(&format!(
        "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
         -keyout {} -out {} -subj /CN={name} -addext basicConstraints=critical,CA:TRUE \
         -addext keyUsage=critical,keyCertSign,cRLSign",
        p(&key),
        p(&crt)
    ));
    (crt, key)
}

/// A certificate for 127.0.0.1 signed by `ca`, good for both ends of TLS
/// (etcd's gateway presents its server certificate to etcd itself).
pub fn make_leaf(
    dir: &Path,
    name: &str,
    subject: &str,
    ca: &(PathBuf, PathBuf),
) -> (PathBuf, PathBuf) {
    let file = |ext: &str| dir.join(format!("{name}.{ext}"));
    let (crt, key, csr, ext) = (file("crt"), file("key"), file("csr"), file("ext"));
    openssl(&format!(
        "req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout {} -out {} -subj {subject}",
        p(&key),
        p(&csr)
    ));
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    openssl(&format!(
        "x509 -req -in {} -CA {} -CAkey {} -CAcreateserial -days 2 -out {} -extfile {}",
        p(&csr),
        p(&ca.0),
        p(&ca.1),
        p(&crt),
        p(&ext)
    ));
    (crt, key)
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
        Self::start_with(n, None)
    }

    /// One member with TLS (client certificates required) and auth on:
    /// users `root` and `portico`, the latter allowed readwrite on
    /// /portico/v1/ only.
    pub fn start_secure(security: Security) -> Etcd {
        Self::start_with(1, Some(security))
    }

    fn start_with(n: usize, security: Option<Security>) -> Etcd {
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
        let secure = security.map(|s| Secure::make(&dir, s));
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
            secure,
        };
        for i in 0..n {
            etcd.spawn(i);
        }
        etcd.wait_ready();
        if etcd.secure.is_some() {
            etcd.enable_auth();
        }
        etcd
    }

    pub fn secure(&self) -> &Secure {
        self.secure.as_ref().expect("a secured etcd")
    }

    /// The client URL scheme.
    fn scheme(&self) -> &'static str {
        if self.secure.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Portico's flags for this etcd: members, TLS files, user, password.
    pub fn flags(&self) -> Vec<String> {
        let mut out = vec!["--etcd".to_owned(), self.endpoints()];
        if let Some(s) = &self.secure {
            for (flag, path) in [
                ("--etcd-ca-cert", &s.ca),
                ("--etcd-cert", &s.client.0),
                ("--etcd-key", &s.client.1),
                ("--etcd-password-file", &s.password_file),
            ] {
                out.push(flag.to_owned());
                out.push(p(path).to_owned());
            }
            out.push("--etcd-user".to_owned());
            out.push(USER.to_owned());
        }
        out
    }

    /// Users, roles and auth on, as an operator would with etcdctl.
    fn enable_auth(&mut self) {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let s = self.secure();
        let (root_pw, pw) = (s.root_password.clone(), s.password.clone());
        let calls = [
            ("/v3/auth/role/add", r#"{"name":"root"}"#.to_owned()),
            (
                "/v3/auth/user/add",
                format!(r#"{{"name":"root","password":"{root_pw}"}}"#),
            ),
            (
                "/v3/auth/user/grant",
                r#"{"user":"root","role":"root"}"#.to_owned(),
            ),
            ("/v3/auth/role/add", format!(r#"{{"name":"{USER}"}}"#)),
            (
                "/v3/auth/role/grant",
                format!(
                    r#"{{"name":"{USER}","perm":{{"permType":"READWRITE","key":"{}","range_end":"{}"}}}}"#,
                    b64.encode("/portico/v1/"),
                    b64.encode("/portico/v10")
                ),
            ),
            (
                "/v3/auth/user/add",
                format!(r#"{{"name":"{USER}","password":"{pw}"}}"#),
            ),
            (
                "/v3/auth/user/grant",
                format!(r#"{{"user":"{USER}","role":"{USER}"}}"#),
            ),
            ("/v3/auth/enable", "{}".to_owned()),
        ];
        let member = self.members[0].client;
        for (path, body) in calls {
            let got = self.request(member, path, &body);
            assert!(matches!(got, Some((200, _))), "{path}: {got:?}");
        }
        self.secure.as_mut().unwrap().auth_on = true;
    }

    /// A token for `user`, or None when etcd refuses.
    pub fn authenticate(&self, user: &str, password: &str) -> Option<String> {
        let body = format!(r#"{{"name":"{user}","password":"{password}"}}"#);
        let (status, out) =
            self.curl(self.members[0].client, "/v3/auth/authenticate", &body, None)?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        (status == 200).then(|| v["token"].as_str().map(str::to_owned))?
    }

    /// One POST over TLS with curl, the status and body.
    pub fn curl(
        &self,
        addr: SocketAddr,
        path: &str,
        body: &str,
        token: Option<&str>,
    ) -> Option<(u16, String)> {
        let s = self.secure();
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "3", "-X", "POST"])
            .args([
                "--cacert",
                p(&s.ca),
                "--cert",
                p(&s.client.0),
                "--key",
                p(&s.client.1),
            ])
            .args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                body,
            ])
            .args(["-w", "\n%{http_code}"]);
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: {t}")]);
        }
        let out = cmd.arg(format!("https://{addr}{path}")).output().ok()?;
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n')?;
        Some((status.trim().parse().ok()?, body.to_owned()))
    }

    /// A POST to member `addr` as the harness: plain, or over TLS as root.
    fn request(&self, addr: SocketAddr, path: &str, body: &str) -> Option<(u16, String)> {
        let Some(s) = &self.secure else {
            return post(addr, path, body);
        };
        // JWT tokens may expire between calls: a new one for each.
        let token = if s.auth_on {
            Some(self.authenticate("root", &s.root_password)?)
        } else {
            None
        };
        self.curl(addr, path, body, token.as_deref())
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let data = self.dir.join(&m.name);
        let log = std::fs::File::create(self.dir.join(format!("{}.log", m.name))).unwrap();
        let scheme = self.scheme();
        let mut cmd = Command::new("etcd");
        if let Some(s) = &self.secure {
            cmd.args(["--cert-file", p(&s.server.0), "--key-file", p(&s.server.1)])
                .args(["--trusted-ca-file", p(&s.ca), "--client-cert-auth"]);
            if let Some(t) = &s.auth_token {
                cmd.args(["--auth-token", t]);
            }
        }
        let child = cmd
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &format!("{scheme}://{}", m.client)])
            .args([
                "--advertise-client-urls",
                &format!("{scheme}://{}", m.client),
            ])
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
            .map(|m| format!("{}://{}", self.scheme(), m.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Wait until a live member answers a linearizable read.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            for m in self.members.iter().filter(|m| m.child.is_some()) {
                if let Some((200, _)) = self.request(m.client, "/v3/kv/range", r#"{"key":"AA=="}"#)
                {
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
                let Some((200, body)) = self.request(m.client, "/v3/maintenance/status", "{}")
                else {
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
                if let Some((200, out)) = self.request(m.client, "/v3/kv/range", &body) {
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

impl Secure {
    fn make(dir: &Path, security: Security) -> Secure {
        let ca = make_ca(dir, "etcd-ca");
        let server = make_leaf(dir, "etcd-server", "/CN=etcd-server", &ca);
        let client = make_leaf(dir, "portico-client", "/O=portico", &ca);
        let password = format!("pw-{}", fastrand::u64(..));
        let password_file = dir.join("portico.password");
        std::fs::write(&password_file, format!("{password}\n")).unwrap();
        Secure {
            ca: ca.0,
            server,
            client,
            password,
            password_file,
            root_password: format!("root-{}", fastrand::u64(..)),
            auth_token: security.jwt_ttl.map(|ttl| jwt_flag(dir, ttl)),
            auth_on: false,
        }
    }

    /// A file in the etcd's directory, for a test's own files.
    pub fn dir(&self) -> &Path {
        self.ca.parent().unwrap()
    }
}

/// etcd's --auth-token for RS256 JWT tokens lasting `ttl`, with a key pair
/// made in `dir`.
fn jwt_flag(dir: &Path, ttl: &str) -> String {
    let (private, public) = (dir.join("jwt.key"), dir.join("jwt.pub"));
    openssl(&format!("genrsa -out {} 2048", p(&private)));
    openssl(&format!(
        "rsa -in {} -pubout -out {}",
        p(&private),
        p(&public)
    ));
    format!(
        "jwt,pub-key={},priv-key={},sign-method=RS256,ttl={ttl}",
        p(&public),
        p(&private)
    )
}
