//! `vmlab bench net`: member-to-member TCP throughput (iperf3) and
//! round-trip time (ping) between two network namespaces on a lab
//! network, against two namespaces on a Linux bridge with veth pairs (the
//! kernel's own switch, the upper bound) in the same run, rounds
//! interleaved. `--nat` instead measures a lab member's NAT (a namespace
//! member to an iperf3 server on the host's loopback through the
//! gateway) against `--net user`'s engine (`vmlab nat --tap` serving a
//! namespace, the same server through 10.0.2.2). Needs root, `ip`,
//! `iperf3`, and `ping` or busybox. Everything it makes (namespaces, the
//! network, the NAT process, a scratch state directory) goes at the end.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
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

/// How many rounds, how long each iperf3 run lasts, and what is compared.
pub struct NetBench {
    pub runs: u32,
    pub seconds: u32,
    pub mode: NetBenchMode,
}

/// Which two paths the rounds alternate between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetBenchMode {
    /// Member to member on a lab network, against a Linux bridge.
    Switch,
    /// A lab member to the host's loopback through the gateway's NAT,
    /// against `--net user`'s NAT (`vmlab nat --tap`).
    Nat,
}

/// One contender's samples: Gbit/s and microseconds.
#[derive(Default)]
struct Samples {
    gbits: Vec<f64>,
    rtt_us: Vec<f64>,
}

/// A client namespace and where its iperf3 server runs: in a namespace,
/// or (`None`) on the host's loopback, reached at `server_ip`.
struct Pair {
    client: String,
    server: Option<String>,
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
        let load_before = load_average();
        let mut scene = Scene::new(self.mode)?;
        let (first, second) = match self.mode {
            NetBenchMode::Switch => (scene.lab_pair()?, scene.bridge_pair()?),
            NetBenchMode::Nat => (scene.lab_nat_pair()?, scene.user_nat_pair()?),
        };
        let (mut on_first, mut on_second) = (Samples::default(), Samples::default());
        for round in 0..self.runs {
            eprintln!("round {}/{}", round + 1, self.runs);
            self.sample(&first, &mut on_first)?;
            self.sample(&second, &mut on_second)?;
        }
        let mut text = match self.mode {
            NetBenchMode::Switch => table(&on_first, &on_second),
            NetBenchMode::Nat => nat_table(&on_first, &on_second),
        };
        text.push_str(&format!(
            "host load average (1 min) before {load_before}, after {}\n",
            load_average()
        ));
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

/// The first `/proc/loadavg` field, or "?" where there is none.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn median(v: &[f64]) -> f64 {
    Summary::of(v).map_or(f64::NAN, |s| s.median)
}

/// Two rows of medians under `title`, then the ratios of the first to the
/// second, named `ratio_name`, with the throughput target.
fn comparison(title: &str, rows: [(&str, &Samples); 2], ratio_name: &str, target: f64) -> String {
    let [(first_name, first), (second_name, second)] = rows;
    let (g1, g2) = (median(&first.gbits), median(&second.gbits));
    let (r1, r2) = (median(&first.rtt_us), median(&second.rtt_us));
    let mut out = String::new();
    out.push_str(&format!(
        "{title}, medians of {} interleaved rounds\n",
        first.gbits.len()
    ));
    out.push_str(&format!(
        "  {:<28} {:>10} {:>10}\n",
        "", "TCP Gbit/s", "RTT us"
    ));
    out.push_str(&format!("  {first_name:<28} {g1:>10.2} {r1:>10.0}\n"));
    out.push_str(&format!("  {second_name:<28} {g2:>10.2} {r2:>10.0}\n"));
    out.push_str(&format!(
        "throughput {ratio_name} {:.2}x (target >= {target}x), RTT {ratio_name} {:.2}x\n",
        g1 / g2,
        r1 / r2
    ));
    out
}

fn table(lab: &Samples, bridge: &Samples) -> String {
    comparison(
        "netns to netns",
        [("vmlab lab network", lab), ("Linux bridge + veth", bridge)],
        "vmlab/bridge",
        0.5,
    )
}

fn nat_table(lab: &Samples, user: &Samples) -> String {
    comparison(
        "netns to host loopback through the NAT (RTT: ping the gateway)",
        [
            ("lab network gateway", lab),
            ("--net user (vmlab nat --tap)", user),
        ],
        "lab/user",
        0.9,
    )
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
    let port = match pair.server {
        Some(_) => 5399,
        None => free_loopback_port()?,
    }
    .to_string();
    let mut server = match &pair.server {
        Some(ns) => in_ns(ns, &["iperf3", "-s", "-1", "-p", &port]),
        None => {
            let mut host = Command::new("iperf3");
            host.args(["-s", "-1", "-B", "127.0.0.1", "-p", &port]);
            host
        }
    };
    let mut server = server
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
                &port,
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

/// A port nobody listens on at 127.0.0.1 right now.
fn free_loopback_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| NetBenchError::Step {
            what: "a free port on 127.0.0.1".into(),
            detail: e.to_string(),
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
    /// `vmlab nat` serving the `--net user` namespace.
    nat: Option<Child>,
}

const LAB: &str = "benchnet";
/// The lab network's subnet and its gateway (the subnet's .1).
const LAB_SUBNET: &str = "10.78.0.0/24";
const LAB_GATEWAY: &str = "10.78.0.1";
/// Lab members, in the order they join.
const LAB_MEMBERS: [&str; 2] = ["a", "b"];
/// Where `--net user` puts the guest, and its gateway.
const USER_ADDRESS: &str = "10.0.2.15/24";
const USER_GATEWAY: &str = "10.0.2.2";
const USER_TAP: &str = "tap0";

impl Scene {
    fn new(mode: NetBenchMode) -> Result<Scene> {
        let prefix = format!("vlbench{}", std::process::id());
        let state = std::env::temp_dir().join(&prefix);
        let mut scene = Scene {
            prefix,
            state,
            namespaces: Vec::new(),
            nat: None,
        };
        let suffixes: &[&str] = match mode {
            NetBenchMode::Switch => &["a", "b", "c", "d", "br"],
            NetBenchMode::Nat => &["a", "u"],
        };
        for suffix in suffixes {
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

    fn ns_path(&self, suffix: &str) -> PathBuf {
        Path::new("/run/netns").join(self.ns(suffix))
    }

    /// vmlab with this scene's own state directories.
    fn vmlab_command(&self, args: &[&str]) -> Result<Command> {
        let exe = std::env::current_exe().map_err(|e| NetBenchError::Step {
            what: "vmlab".into(),
            detail: e.to_string(),
        })?;
        let mut command = Command::new(exe);
        command
            .args(args)
            .env("XDG_DATA_HOME", self.state.join("data"))
            .env("XDG_RUNTIME_DIR", self.state.join("run"));
        Ok(command)
    }

    fn vmlab(&self, args: &[&str]) -> Result<String> {
        let out = run(
            &format!("vmlab {}", args.join(" ")),
            &mut self.vmlab_command(args)?,
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn create_lab(&self) -> Result<()> {
        self.vmlab(&["network", "create", LAB, "--subnet", LAB_SUBNET])
            .map(drop)
    }

    /// Attaches namespace `suffix` to the lab network; its leased address.
    fn attach(&self, suffix: &str) -> Result<String> {
        let path = self.ns_path(suffix);
        let out = self.vmlab(&["network", "attach", LAB, "--netns", path.to_str().unwrap()])?;
        // "NAME joined NET as IP (MAC)"
        Ok(out
            .split_whitespace()
            .nth(4)
            .unwrap_or_default()
            .to_string())
    }

    /// Two namespaces attached to a lab network (addresses from leases).
    fn lab_pair(&self) -> Result<Pair> {
        self.create_lab()?;
        let mut ips = Vec::new();
        for suffix in LAB_MEMBERS {
            ips.push(self.attach(suffix)?);
        }
        Ok(Pair {
            client: self.ns("a"),
            server: Some(self.ns("b")),
            server_ip: ips.pop().unwrap_or_default(),
        })
    }

    /// One lab member, reaching the host's loopback at its gateway.
    fn lab_nat_pair(&self) -> Result<Pair> {
        self.create_lab()?;
        self.attach("a")?;
        Ok(Pair {
            client: self.ns("a"),
            server: None,
            server_ip: LAB_GATEWAY.into(),
        })
    }

    /// A namespace served by `vmlab nat --tap` (`--net user`'s engine),
    /// configured as the guest of `--net user` is.
    fn user_nat_pair(&mut self) -> Result<Pair> {
        let ns = self.ns("u");
        let path = self.ns_path("u");
        let child = self
            .vmlab_command(&["nat", "--tap", USER_TAP, "--netns", path.to_str().unwrap()])?
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| NetBenchError::Step {
                what: "vmlab nat --tap".into(),
                detail: e.to_string(),
            })?;
        self.nat = Some(child);
        let start = Instant::now();
        while run(
            "ip link show",
            &mut in_ns(&ns, &["ip", "link", "show", USER_TAP]),
        )
        .is_err()
        {
            if start.elapsed() > Duration::from_secs(10) {
                return Err(NetBenchError::Step {
                    what: "vmlab nat --tap".into(),
                    detail: format!("no {USER_TAP} in {ns} after 10 s"),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        ip(&["-n", &ns, "link", "set", USER_TAP, "up"])?;
        ip(&["-n", &ns, "addr", "add", USER_ADDRESS, "dev", USER_TAP])?;
        ip(&["-n", &ns, "route", "add", "default", "via", USER_GATEWAY])?;
        Ok(Pair {
            client: ns,
            server: None,
            server_ip: USER_GATEWAY.into(),
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
            server: Some(self.ns("d")),
            server_ip: "10.79.0.2".into(),
        })
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        if let Some(mut nat) = self.nat.take() {
            let _ = nat.kill();
            let _ = nat.wait();
        }
        for suffix in LAB_MEMBERS {
            if self.namespaces.contains(&self.ns(suffix)) {
                let path = self.ns_path(suffix);
                let _ = self.vmlab(&["network", "detach", LAB, "--netns", path.to_str().unwrap()]);
            }
        }
        let _ = self.vmlab(&["network", "rm", LAB]);
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(gbits: &[f64], rtt_us: &[f64]) -> Samples {
        Samples {
            gbits: gbits.to_vec(),
            rtt_us: rtt_us.to_vec(),
        }
    }

    #[test]
    fn nat_table_shows_medians_and_the_ratio_against_the_target() {
        let lab = samples(&[4.0, 9.0, 4.5], &[40.0, 50.0, 60.0]);
        let user = samples(&[5.0, 5.0, 1.0], &[25.0, 20.0, 30.0]);
        let text = nat_table(&lab, &user);
        assert!(text.contains("medians of 3 interleaved rounds"), "{text}");
        assert!(
            text.contains("lab network gateway                4.50         50"),
            "{text}"
        );
        assert!(
            text.contains("--net user (vmlab nat --tap)       5.00         25"),
            "{text}"
        );
        assert!(
            text.contains("throughput lab/user 0.90x (target >= 0.9x), RTT lab/user 2.00x"),
            "{text}"
        );
    }

    #[test]
    fn switch_table_keeps_its_bridge_target() {
        let text = table(&samples(&[3.0], &[30.0]), &samples(&[12.0], &[10.0]));
        assert!(
            text.contains("throughput vmlab/bridge 0.25x (target >= 0.5x), RTT vmlab/bridge 3.00x"),
            "{text}"
        );
        assert!(text.contains("Linux bridge + veth"), "{text}");
    }
}
