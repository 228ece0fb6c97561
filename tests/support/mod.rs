//! What the three test binaries (`api`, `cli`, `engine`) share: a `vitforge serve` child process
//! ([`ChildServer`]), the tiny ViT configuration and a base-model installer, and a file walker.
//! Each binary includes it with `#[path = "../support/mod.rs"] mod support;` and uses what it
//! needs, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod exif;
pub mod hub;
pub mod pictures;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

/// The tiny ViT every fast test uses: 32×32 input, patch 8, 2 layers of width 32.
pub const TINY_CONFIG: &str = r#"{"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}"#;

/// A ViT slow enough that an epoch is long compared with polling (64×64 input, 4 layers).
pub const SLOW_CONFIG: &str = r#"{"model_type": "vit", "image_size": 64, "patch_size": 8, "hidden_size": 64,
    "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128}"#;

/// The tiny configuration.
pub fn tiny_config() -> vitforge::model::VitConfig {
    vitforge::model::VitConfig::from_json(TINY_CONFIG).unwrap()
}

/// The slow configuration.
pub fn slow_config() -> vitforge::model::VitConfig {
    vitforge::model::VitConfig::from_json(SLOW_CONFIG).unwrap()
}

/// Writes a random model of `cfg` with `labels` as base model `name` of a data folder, so jobs
/// can use `"base_model": name` without any download.
pub fn install_base_model(data_dir: &Path, name: &str, cfg: &vitforge::model::VitConfig, labels: &[&str]) {
    let labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
    let model = vitforge::model::LoadedModel::random(cfg, &labels, 1, &candle_core::Device::Cpu).unwrap();
    model.save(&data_dir.join("base-models").join(name)).unwrap();
}

/// Every entry under `dir` (files and folders; links are listed, not followed), relative to
/// `dir`, sorted.
pub fn entries_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() && !path.is_symlink() {
                stack.push(path.clone());
            }
            out.push(path.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    out.sort();
    out
}

/// The files (not folders) under `dir`, relative to it, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    entries_under(dir).into_iter().filter(|p| !dir.join(p).is_dir()).collect()
}

/// A memory figure of a process in MiB: `field` is a line of `/proc/<pid>/status` (`VmRSS:`, or
/// `VmHWM:` for the peak since the last [`reset_peak_rss`]); 0 when the process is gone.
pub fn rss_mib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) / 1024
}

/// Resets a process's peak resident set size (`VmHWM`) to its current size.
pub fn reset_peak_rss(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

/// The PostgreSQL server the tests run against instead of SQLite, when `VITFORGE_TEST_POSTGRES`
/// names one (`postgres://user@host:port/db`, a user who may create databases);
/// `scripts/test-postgres.sh` starts a private one and runs the API tests with it.
pub fn test_postgres() -> Option<String> {
    std::env::var("VITFORGE_TEST_POSTGRES").ok().filter(|u| !u.is_empty())
}

/// The database URL of a test service on `data_dir`: `None` for the default (SQLite in the
/// folder), or, under `VITFORGE_TEST_POSTGRES`, a database of its own on that server, named after
/// the folder (so a service restarted on the same folder finds its data) and created on first use.
pub fn database_url(data_dir: &Path) -> Option<String> {
    let admin = test_postgres()?;
    let name = format!("vitforge_test_{}", folder_tag(data_dir));
    let create = format!("create database {name}");
    let admin_url = admin.clone();
    // Its own thread and runtime, so it can be called from sync and async code alike.
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            use sqlx::{Connection, Executor};
            let mut conn = sqlx::PgConnection::connect(&admin_url).await.unwrap_or_else(|e| panic!("VITFORGE_TEST_POSTGRES: {e}"));
            match conn.execute(sqlx::AssertSqlSafe(create)).await {
                Ok(_) => {}
                // 42P04: it exists already (a restart on the same folder).
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
                Err(e) => panic!("creating the test database: {e}"),
            }
        })
    })
    .join()
    .unwrap();
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(base, _)| base);
    Some(format!("{base}/{name}"))
}

/// The object store of a test service on `data_dir`: `None` for the default (the data folder), or,
/// under `VITFORGE_TEST_S3` (`s3://bucket`, with the `AWS_*` variables of its server set), a prefix
/// of its own in that bucket, named after the folder (so a restart on the same folder finds its
/// objects). `scripts/test-postgres.sh` starts a private S3 server for it.
pub fn object_store_url(data_dir: &Path) -> Option<String> {
    let bucket = std::env::var("VITFORGE_TEST_S3").ok().filter(|u| !u.is_empty())?;
    Some(format!("{}/test-{}", bucket.trim_end_matches('/'), folder_tag(data_dir)))
}

/// A name of a test service's data folder, the same for the same folder (a restart on it).
fn folder_tag(data_dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    data_dir.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// An S3-compatible server of one test's own (`moto_server`, PyPI `moto[server]`) on a loopback
/// port, with one bucket; the test may stop and start it again. Killed when dropped.
pub struct PrivateS3 {
    child: Option<Child>,
    pub port: u16,
    pub bucket: String,
}

impl PrivateS3 {
    /// Starts `moto_server` and creates the bucket, or `None` when it is not installed. Panics when
    /// it is missing and `VITFORGE_REQUIRE_S3=1` (`.ci/run` installs it and sets that).
    pub async fn start() -> Option<Self> {
        let found = Command::new("moto_server").arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        if !found {
            assert!(std::env::var_os("VITFORGE_REQUIRE_S3").is_none_or(|v| v != "1"), "VITFORGE_REQUIRE_S3=1 but moto_server is not installed");
            eprintln!("moto_server (pip install 'moto[server]') is not installed: this object-store test is skipped");
            return None;
        }
        // The port is free when we ask, but another process may take it before moto binds it:
        // then moto exits and we try another.
        let mut last = String::new();
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut s3 = Self { child: None, port, bucket: "vitforge".into() };
            match s3.try_up().await {
                Ok(()) => return Some(s3),
                Err(log) => last = log,
            }
        }
        panic!("moto_server exited three times on a fresh port; its last output:\n{last}");
    }

    /// Starts the server (again, empty: moto keeps everything in memory, on the same port) and
    /// creates the bucket.
    pub async fn up(&mut self) {
        if let Err(log) = self.try_up().await {
            panic!("moto_server exited on port {}; its output:\n{log}", self.port);
        }
    }

    /// Starts the server and creates the bucket; `Err` with its output when it exits first.
    /// Panics when it neither answers nor exits within 120 s: it starts in about a second on an
    /// idle machine, but under `.ci/run`'s load (a Python start with no bytecode cache, beside a
    /// test binary's parallel tests) once took more than 30 s.
    async fn try_up(&mut self) -> Result<(), String> {
        let log_path = std::env::temp_dir().join(format!("vitforge-moto-{}-{}.log", std::process::id(), self.port));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let started = std::time::Instant::now();
        let url = format!("{}/{}", self.endpoint(), self.bucket);
        let client = reqwest::Client::new();
        let outcome = loop {
            let created = client.put(&url).timeout(Duration::from_secs(10)).send().await;
            if created.is_ok_and(|r| r.status().is_success()) {
                break Ok(());
            }
            if let Ok(Some(status)) = self.child.as_mut().unwrap().try_wait() {
                self.child = None;
                break Err(format!("({status})\n{}", std::fs::read_to_string(&log_path).unwrap_or_default()));
            }
            let waited = started.elapsed();
            assert!(waited < Duration::from_secs(120), "moto_server did not answer within {waited:?}; its output:\n{}", std::fs::read_to_string(&log_path).unwrap_or_default());
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let _ = std::fs::remove_file(&log_path);
        outcome
    }

    /// Stops the server (SIGKILL).
    pub fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The variables that point a `vitforge serve` at it, with `prefix` in the bucket.
    pub fn env(&self, prefix: &str) -> Vec<(String, String)> {
        [
            ("VITFORGE_OBJECT_STORE", format!("s3://{}/{prefix}", self.bucket)),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The keys stored under `prefix` (S3 ListObjectsV2, at most 1,000).
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let url = format!("{}/{}?list-type=2&prefix={prefix}", self.endpoint(), self.bucket);
        let answer = reqwest::get(&url).await.unwrap();
        assert!(answer.status().is_success(), "listing {url}: {}", answer.status());
        let xml = answer.text().await.unwrap();
        xml.split("<Key>").skip(1).filter_map(|s| s.split("</Key>").next()).map(str::to_string).collect()
    }

    /// Stores `bytes` at `key`, behind the service's back.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) {
        use object_store::ObjectStore;
        let mut builder = object_store::aws::AmazonS3Builder::new().with_bucket_name(&self.bucket);
        for (name, value) in self.env("").into_iter().filter(|(k, _)| k.starts_with("AWS_")) {
            builder = builder.with_config(name.to_ascii_lowercase().parse().unwrap(), value);
        }
        let store = builder.build().unwrap();
        store.put(&object_store::path::Path::from(key), bytes.into()).await.unwrap_or_else(|e| panic!("storing {key}: {e}"));
    }
}

impl Drop for PrivateS3 {
    fn drop(&mut self) {
        self.down();
    }
}

/// A connection pool on the database of a test service on `data_dir` (either backend), for tests
/// that look at rows directly.
pub async fn open_database(data_dir: &Path) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    let url = database_url(data_dir).unwrap_or_else(|| format!("sqlite://{}", data_dir.join("vitforge.db").display()));
    sqlx::AnyPool::connect(&url).await.unwrap_or_else(|e| panic!("opening {url}: {e}"))
}

/// A PostgreSQL server of one test's own, which it may stop and start again (the shared one of
/// `VITFORGE_TEST_POSTGRES` must stay up for the other tests). Run as the `postgres` user when the
/// tests run as root (initdb refuses root). Stopped and removed when dropped.
pub struct PrivatePostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
    as_root: bool,
}

impl PrivatePostgres {
    /// `initdb` and start, or `None` when no PostgreSQL is installed (`PG_BIN`, else the newest
    /// `/usr/lib/postgresql/*/bin`).
    pub fn start() -> Option<Self> {
        let bin = std::env::var_os("PG_BIN").map(PathBuf::from).or_else(|| {
            let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql").ok()?.flatten().map(|e| e.path().join("bin")).collect();
            found.sort();
            found.pop()
        })?;
        if !bin.join("initdb").exists() {
            return None;
        }
        let dir = tempfile::Builder::new().prefix("vitforge-pg-").tempdir_in("/tmp").unwrap();
        let as_root = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false);
        if as_root {
            assert!(Command::new("chown").arg("postgres:").arg(dir.path()).status().unwrap().success());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let pg = Self { bin, dir, port, as_root };
        let data = pg.dir.path().join("data");
        let out = pg.command("initdb").arg("-D").arg(&data).args(["-U", "postgres", "--auth=trust", "--no-locale", "-E", "UTF8"]).output().unwrap();
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        pg.up();
        Some(pg)
    }

    fn command(&self, tool: &str) -> Command {
        let mut cmd = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(tool));
            c
        } else {
            Command::new(self.bin.join(tool))
        };
        cmd.stdout(Stdio::null());
        cmd
    }

    /// Starts the server (again) on the same data and port, and waits until it accepts connections.
    pub fn up(&self) {
        let dir = self.dir.path();
        let options = format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, dir.display());
        let status = self.command("pg_ctl").arg("-D").arg(dir.join("data")).arg("-l").arg(dir.join("log")).args(["-w", "-o", &options, "start"]).status().unwrap();
        assert!(status.success(), "pg_ctl start: {}", std::fs::read_to_string(dir.join("log")).unwrap_or_default());
    }

    /// Stops the server (fast: open connections are cut).
    pub fn down(&self) {
        let status = self.command("pg_ctl").arg("-D").arg(self.dir.path().join("data")).args(["-m", "fast", "-w", "stop"]).status().unwrap();
        assert!(status.success(), "pg_ctl stop");
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.command("pg_ctl").arg("-D").arg(self.dir.path().join("data")).args(["-m", "immediate", "stop"]).status();
    }
}

/// How to start a `vitforge serve` child process.
pub struct Launch {
    bin: PathBuf,
    data_dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<PathBuf>,
    log_file: Option<PathBuf>,
    level: String,
    port: u16,
}

impl Launch {
    /// `vitforge serve --port 0 --data-dir <data_dir>`, logging at `warn` (`$VITFORGE_BIN`
    /// replaces the binary under test, to compare builds).
    pub fn new(data_dir: &Path) -> Self {
        let bin = std::env::var_os("VITFORGE_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_vitforge")));
        let mut env: Vec<(String, String)> = database_url(data_dir).map(|url| ("VITFORGE_DATABASE_URL".to_string(), url)).into_iter().collect();
        env.extend(object_store_url(data_dir).map(|url| ("VITFORGE_OBJECT_STORE".to_string(), url)));
        Self { bin, data_dir: data_dir.to_path_buf(), args: vec![], env, cwd: None, log_file: None, level: "warn".into(), port: 0 }
    }

    /// More `serve` flags.
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.args.extend(args.iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// An environment variable of the child.
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.env.push((key.to_string(), value.as_ref().to_string_lossy().into_owned()));
        self
    }

    /// Several environment variables of the child (later ones win).
    pub fn envs(mut self, vars: Vec<(String, String)>) -> Self {
        self.env.extend(vars);
        self
    }

    /// The child's working folder.
    pub fn cwd(mut self, dir: &Path) -> Self {
        self.cwd = Some(dir.to_path_buf());
        self
    }

    /// Also writes the child's log to this file.
    pub fn log_file(mut self, path: &Path) -> Self {
        self.log_file = Some(path.to_path_buf());
        self
    }

    /// The port to listen on (default 0: one the system picks), e.g. a restarted server's old one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// The `RUST_LOG` level (default `warn`); start-up's address line is always logged.
    pub fn level(mut self, level: &str) -> Self {
        self.level = level.to_string();
        self
    }

    /// Starts the child and waits until it has logged the address it listens on.
    pub fn start(self) -> ChildServer {
        let rust_log = if matches!(self.level.as_str(), "debug" | "trace") {
            self.level.clone()
        } else {
            format!("{},vitforge::startup=info", self.level)
        };
        let mut cmd = Command::new(&self.bin);
        cmd.args(["serve", "--port", &self.port.to_string(), "--log-format", "json", "--data-dir"]).arg(&self.data_dir).args(&self.args);
        cmd.env("RUST_LOG", rust_log).env("RUST_BACKTRACE", "0").stdout(Stdio::null()).stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(cwd) = &self.cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        let (thread_log, log_file) = (log.clone(), self.log_file.clone());
        let reader = std::thread::spawn(move || read_log(stderr, &thread_log, log_file.as_deref(), addr_tx));
        let addr = match addr_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("vitforge did not log its address within 60 s:\n{}", log.lock().unwrap());
            }
        };
        // A server bound to every interface is reached on loopback.
        let addr = addr.replace("0.0.0.0:", "127.0.0.1:").replace("[::]:", "[::1]:");
        let client = reqwest::Client::builder().timeout(Duration::from_secs(300)).pool_max_idle_per_host(1024).build().unwrap();
        ChildServer { child, base: format!("http://{addr}"), client, log, reader: Some(reader) }
    }
}

/// Copies the child's log lines to the buffer (and the file), and sends the address of the
/// start-up line `{"fields": {"message": "vitforge listening", "addr": …}}` once.
fn read_log(stderr: std::process::ChildStderr, log: &Mutex<String>, file: Option<&Path>, addr: mpsc::Sender<String>) {
    let mut file = file.map(|p| std::fs::File::create(p).unwrap());
    let mut sent = false;
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if let Some(f) = file.as_mut() {
            let _ = writeln!(f, "{line}");
        }
        if !sent
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v["fields"]["message"] == "vitforge listening"
            && let Some(a) = v["fields"]["addr"].as_str()
        {
            sent = addr.send(a.to_string()).is_ok();
        }
        let mut log = log.lock().unwrap();
        log.push_str(&line);
        log.push('\n');
    }
}

/// A running `vitforge serve` child process, killed when dropped.
pub struct ChildServer {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// A client with a generous timeout and a large pool.
    pub client: reqwest::Client,
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl ChildServer {
    /// The full URL of a path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the child has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// GET a path and read the answer as JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.client.get(self.url(path)).send().await.unwrap().json().await.unwrap()
    }

    /// POST a JSON body to a path and read the answer as JSON.
    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> serde_json::Value {
        self.client.post(self.url(path)).json(body).send().await.unwrap().json().await.unwrap()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGKILL, and waits for the process to go.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM (a graceful stop); waits for the process to exit and returns its status and
    /// everything it logged.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        Command::new("kill").arg(self.child.id().to_string()).status().unwrap();
        let status = self.child.wait().unwrap();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        (status, self.log())
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
