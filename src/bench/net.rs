//! `vmlab bench net`: member-to-member TCP throughput (iperf3) and
//! round-trip time (ping) between two network namespaces on a lab
//! network, against two namespaces on a Linux bridge with veth pairs (the
//! kernel's own switch, the upper bound) in the same run, rounds
//! interleaved. Needs root, `ip`, `iperf3`, and `ping` or busybox. Everything it makes
//! (namespaces, the network, a scratch state directory) goes at the end.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::stats::Summary;

#[derive(Debug, thiserror::Error)]
pub enum NetBenchError {
    #[error("vmlab bench net needs root (it makes network namespaces): run it with sudo")]
    NotRoot,
    #[error("vmlab bench net needs {0} on PATH")]
    MissingTool(&'static str),
    #[error("{what} failed: {detail}")]
    Step { what: String, detail: String },
}

type Result<T> = std::result::Result<T, NetBenchError>;

/// How many rounds, and how long each iperf3 run lasts.
pub struct NetBench {
    pub runs: u32,
    pub seconds: u32,
}

/// One contender's samples: Gbit/s and microseconds.
#[derive(Default)]
struct Samples {
    gbits: Vec<f64>,
    rtt_us: Vec<f64>,
}

/// Two namespaces that can reach each other, server at `server_ip`.
struct Pair {
    client: String,
    server: String,
    server_ip: String,
}

impl NetBench {
    /// Runs the rounds and prints the table; the text is also returned.
    pub fn run(&self) -> Result<String> {
        // SAFETY: geteuid has no preconditions and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            return Err(NetBenchError::NotRoot);
        }
        for tool in ["ip", "iperf3"] {
            if !on_path(tool) {
                return Err(NetBenchError::MissingTool(tool));
            }
        }
        if !on_path("ping") && !on_path("busybox") {
            return Err(NetBenchError::MissingTool("ping (or busybox)"));
        }
        let scene = Scene::new()?;
        let lab = scene.lab_pair()?;
        let bridge = scene.bridge_pair()?;
        let (mut on_lab, mut on_bridge) = (Samples::default(), Samples::default());
        for round in 0..self.runs {
            eprintln!("round {}/{}", round + 1, self.runs);
            self.sample(&lab, &mut on_lab)?;
            self.sample(&bridge, &mut on_bridge)?;
        }
        let text = table(&on_lab, &on_bridge);
        print!("{text}");
        Ok(text)
    }

    fn sample(&self, pair: &Pair, into: &mut Samples) -> Result<()> {
        into.gbits.push(iperf(pair, self.seconds)?);
        into.rtt_us.push(rtt(pair)?);
        Ok(())
    }
}

fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn table(lab: &Samples, bridge: &Samples) -> String {
    let median = |v: &[f64]| Summary::of(v).map_or(f64::NAN, |s| s.median);
    let (lg, bg) = (median(&lab.gbits), median(&bridge.gbits));
    let (lr, br) = (median(&lab.rtt_us), median(&bridge.rtt_us));
    let mut out = String::new();
    out.push_str("netns to netns, medians of interleaved rounds\n");
    out.push_str(&format!(
        "  {:<28} {:>10} {:>10}\n",
        "", "TCP Gbit/s", "RTT us"
    ));
    out.push_str(&format!(
        "  {:<28} {lg:>10.2} {lr:>10.0}\n",
        "vmlab lab network"
    ));
    out.push_str(&format!(
        "  {:<28} {bg:>10.2} {br:>10.0}\n",
        "Linux bridge + veth"
    ));
    out.push_str(&format!(
        "throughput vmlab/bridge {:.2}x (target >= 0.5x), RTT vmlab/bridge {:.2}x\n",
        lg / bg,
        lr / br
    ));
    out
}

fn run(what: &str, command: &mut Command) -> Result<Output> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NetBenchError::Step {
            what: what.to_string(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(NetBenchError::Step {
            what: what.to_string(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<()> {
    run(
        &format!("ip {}", args.join(" ")),
        Command::new("ip").args(args),
    )
    .map(drop)
}

fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns]).args(args);
    command
}

/// TCP throughput from client to server, in Gbit/s.
fn iperf(pair: &Pair, seconds: u32) -> Result<f64> {
    let mut server = in_ns(&pair.server, &["iperf3", "-s", "-1", "-p", "5399"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| NetBenchError::Step {
            what: "iperf3 -s".into(),
            detail: e.to_string(),
        })?;
    let start = Instant::now();
    let secs = seconds.to_string();
    let result = loop {
        let out = in_ns(
            &pair.client,
            &[
                "iperf3",
                "-c",
                &pair.server_ip,
                "-p",
                "5399",
                "-t",
                &secs,
                "-J",
            ],
        )
        .stdin(Stdio::null())
        .output();
        let measured = out.as_ref().ok().and_then(|o| {
            let value: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
            value["end"]["sum_received"]["bits_per_second"].as_f64()
        });
        match (measured, out) {
            (Some(bps), _) => break Ok(bps / 1e9),
            // The server may not listen yet.
            _ if start.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            (None, Ok(out)) => break Err(String::from_utf8_lossy(&out.stdout).into_owned()),
            (None, Err(e)) => break Err(e.to_string()),
        }
    };
    let _ = server.kill();
    let _ = server.wait();
    result.map_err(|detail| NetBenchError::Step {
        what: "iperf3 -c".into(),
        detail: detail.chars().take(400).collect(),
    })
}

/// Mean round-trip time of 200 pings back to back, in microseconds.
fn rtt(pair: &Pair) -> Result<f64> {
    let ping: &[&str] = if on_path("ping") {
        &["ping"]
    } else {
        &["busybox", "ping"]
    };
    let mut args = ping.to_vec();
    args.extend(["-q", "-A", "-c", "200", &pair.server_ip]);
    let out = run("ping", &mut in_ns(&pair.client, &args))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "rtt min/avg/max/mdev = 0.031/0.045/0.110/0.010 ms" (iputils),
    // "round-trip min/avg/max = 0.050/0.077/0.167 ms" (busybox)
    text.lines()
        .find_map(|l| {
            l.split_once(" = ")?
                .1
                .split('/')
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map(|ms| ms * 1000.0)
        .ok_or_else(|| NetBenchError::Step {
            what: "ping".into(),
            detail: text.trim().to_string(),
        })
}

/// What the benchmark made, taken down on drop.
struct Scene {
    prefix: String,
    state: PathBuf,
    namespaces: Vec<String>,
}

const LAB: &str = "benchnet";

impl Scene {
    fn new() -> Result<Scene> {
        let prefix = format!("vlbench{}", std::process::id());
        let state = std::env::temp_dir().join(&prefix);
        let mut scene = Scene {
            prefix,
            state,
            namespaces: Vec::new(),
        };
        for suffix in ["a", "b", "c", "d", "br"] {
            let ns = format!("{}{suffix}", scene.prefix);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            scene.namespaces.push(ns);
        }
        Ok(scene)
    }

    fn ns(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// vmlab with this scene's own state directories.
    fn vmlab(&self, args: &[&str]) -> Result<String> {
        let exe = std::env::current_exe().map_err(|e| NetBenchError::Step {
            what: "vmlab".into(),
            detail: e.to_string(),
        })?;
        let out = run(
            &format!("vmlab {}", args.join(" ")),
            Command::new(exe)
                .args(args)
                .env("XDG_DATA_HOME", self.state.join("data"))
                .env("XDG_RUNTIME_DIR", self.state.join("run")),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Two namespaces attached to a lab network (addresses from leases).
    fn lab_pair(&self) -> Result<Pair> {
        self.vmlab(&["network", "create", LAB, "--subnet", "10.78.0.0/24"])?;
        let mut ips = Vec::new();
        for suffix in ["a", "b"] {
            let path = Path::new("/run/netns").join(self.ns(suffix));
            let out = self.vmlab(&["network", "attach", LAB, "--netns", path.to_str().unwrap()])?;
            // "NAME joined NET as IP (MAC)"
            ips.push(
                out.split_whitespace()
                    .nth(4)
                    .unwrap_or_default()
                    .to_string(),
            );
        }
        Ok(Pair {
            client: self.ns("a"),
            server: self.ns("b"),
            server_ip: ips.pop().unwrap_or_default(),
        })
    }

    /// Two namespaces on a bridge in a third, by veth pairs.
    fn bridge_pair(&self) -> Result<Pair> {
        let br = self.ns("br");
        ip(&["-n", &br, "link", "add", "b0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "b0", "up"])?;
        for (suffix, addr) in [("c", "10.79.0.1/24"), ("d", "10.79.0.2/24")] {
            let ns = self.ns(suffix);
            let port = format!("p{suffix}");
            ip(&[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &br,
            ])?;
            ip(&["-n", &ns, "addr", "add", addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &br, "link", "set", &port, "master", "b0", "up"])?;
        }
        Ok(Pair {
            client: self.ns("c"),
            server: self.ns("d"),
            server_ip: "10.79.0.2".into(),
        })
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        for suffix in ["a", "b"] {
            let path = format!("/run/netns/{}", self.ns(suffix));
            let _ = self.vmlab(&["network", "detach", LAB, "--netns", &path]);
        }
        let _ = self.vmlab(&["network", "rm", LAB]);
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}
