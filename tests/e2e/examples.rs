//! The greeter example as a user runs it: in one process, and as a server
//! process plus a client process that pins the certificate the server wrote.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>/examples/<name>`, which `cargo test` builds.
fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    let path = dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} not built; run through cargo test",
        path.display()
    );
    path
}

fn greeter_binary() -> PathBuf {
    example_binary("greeter")
}

fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("addr").port()
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn output_within(mut child: Child, limit: Duration) -> (bool, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            return (status.success(), text);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "timed out; output so far:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn greeter_in_one_process_prints_the_greeting_via_the_call_back() {
    let cert = std::env::temp_dir().join(format!("brpc-test-one-{}.der", std::process::id()));
    let child = Command::new(greeter_binary())
        .args(["--cert", cert.to_str().expect("utf8")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let (ok, out) = output_within(child, Duration::from_secs(60));
    assert!(ok, "greeter failed:\n{out}");
    assert!(out.contains("server asked for my name"), "{out}");
    assert!(out.contains("reply: Hello, Ada"), "{out}");
}

#[test]
fn greeter_as_two_processes() {
    let cert = std::env::temp_dir().join(format!("brpc-test-two-{}.der", std::process::id()));
    let _ = std::fs::remove_file(&cert);
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let mut server = Command::new(greeter_binary())
        .args([
            "server",
            "--addr",
            &addr,
            "--cert",
            cert.to_str().expect("utf8"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn server");
    let stdout = server.stdout.take().expect("stdout");
    let server = KillOnDrop(server);
    // Wait for the server to say it is listening (it writes the cert first).
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().expect("server output").expect("line");
    assert!(first.contains("listening on"), "{first}");
    assert!(cert.exists());

    let client = Command::new(greeter_binary())
        .args([
            "client",
            "--addr",
            &addr,
            "--cert",
            cert.to_str().expect("utf8"),
            "--name",
            "Linus",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn client");
    let (ok, out) = output_within(client, Duration::from_secs(60));
    assert!(ok, "client failed:\n{out}");
    assert!(out.contains("reply: Hello, Linus"), "{out}");
    drop(server);
    let _ = std::fs::remove_file(&cert);
}

#[test]
fn streaming_example_streams_both_ways() {
    let child = Command::new(example_binary("streaming"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let (ok, out) = output_within(child, Duration::from_secs(60));
    assert!(ok, "streaming example failed:\n{out}");
    assert!(out.contains("[agent] command #2: report-load"), "{out}");
    assert!(out.contains("log: agent log line 3"), "{out}");
    assert!(
        out.contains("server summary: 4 samples, mean cpu 0.62"),
        "{out}"
    );
}

#[test]
fn fleet_example_with_200_agents_restarts_and_exits_0() {
    let child = Command::new(example_binary("fleet"))
        .args(["--agents", "200", "--metrics", "off"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let (ok, out) = output_within(child, Duration::from_secs(240));
    assert!(ok, "fleet example failed:\n{out}");
    assert!(out.contains("registry: 200 agents"), "{out}");
    assert!(
        out.contains("200/200 agents reconnected with a new connection id"),
        "{out}"
    );
    assert!(
        out.contains("all 200 agents answered before and after the restart"),
        "{out}"
    );
}

/// The cluster example: three nodes over a redis-server it starts itself
/// (`.ci/run` installs the package), a broadcast across them, node 3 dying.
#[test]
fn cluster_example_spans_three_nodes_and_survives_one_dying() {
    let child = Command::new(example_binary("cluster"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let (ok, out) = output_within(child, Duration::from_secs(120));
    assert!(ok, "cluster example failed:\n{out}");
    assert!(
        out.contains("broadcast from node 1: 12 agents answered"),
        "{out}"
    );
    assert!(
        out.contains("(node 1: 4, node 2: 4, node 3: 4), 0 failed"),
        "{out}"
    );
    assert!(
        out.contains("every agent answered, before and after node 3 died"),
        "{out}"
    );
}

/// The fleet example's Prometheus endpoint, scraped over loopback HTTP
/// while the fleet stays up: brpc's metrics are there with values.
#[test]
fn fleet_example_exports_prometheus_metrics() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let metrics = format!("127.0.0.1:{port}");
    let mut child = KillOnDrop(
        Command::new(example_binary("fleet"))
            .args(["--agents", "20", "--stay", "--metrics", &metrics])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut out = String::new();
    loop {
        let line = seen
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("the fleet did not come up; output so far:\n{out}"));
        out += &line;
        out += "\n";
        if line.starts_with("staying up") {
            break;
        }
    }
    assert!(
        out.contains(&format!("metrics: http://{metrics}/metrics")),
        "{out}"
    );
    let mut stream = std::net::TcpStream::connect(&metrics).expect("connect to the exporter");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    std::io::Write::write_all(
        &mut stream,
        format!("GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .expect("request");
    let mut body = String::new();
    std::io::Read::read_to_string(&mut stream, &mut body).expect("response");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    // 20 agents are connected now; each answered two broadcasts.
    let value = |name: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(value("brpc_connected_peers"), 20.0, "{body}");
    assert!(body.contains("brpc_calls_total{"), "{body}");
    assert!(value("brpc_calls_total{") >= 40.0, "{body}");
}

/// README's "Use it in your crate" shows exactly the dependency block and
/// build.rs of examples/your-crate, which the workspace builds and tests.
#[test]
fn the_readme_dependency_block_is_the_one_ci_builds() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    let manifest =
        std::fs::read_to_string(root.join("examples/your-crate/Cargo.toml")).expect("manifest");
    let block = |text: &str| -> Vec<String> {
        let start = text
            .find("# --- dependency block ---")
            .expect("block start");
        let end = text.find("# --- end ---").expect("block end");
        text[start..end]
            .lines()
            .map(|l| match l.split_once("  #") {
                Some((code, _)) if l.starts_with("brpc ") => code.trim_end().to_owned(),
                _ => l.to_owned(),
            })
            // The README's checkout beside the crate is this one, two up.
            .map(|l| {
                l.replace("\"../brpc\"", "\"../..\"")
                    .replace("\"../brpc/", "\"../../")
            })
            .collect()
    };
    assert_eq!(block(&readme), block(&manifest));
    let build = std::fs::read_to_string(root.join("examples/your-crate/build.rs")).expect("build");
    assert!(
        readme.contains(&build),
        "README shows examples/your-crate/build.rs"
    );
}
