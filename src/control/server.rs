//! The VM's side of its control socket: one small thread accepts
//! connections, and each connection gets a thread of its own (a console
//! stays attached for long). Nothing here runs on a vCPU thread or waits
//! for one: `stop` only presses the power button.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::console_hub::ConsoleHub;
use super::protocol::{encode, read_message, Request, Response, VmStatus};
use crate::cli::ForwardRule;
use crate::devices::bus::lock;
use crate::net::NatView;
use crate::rate_limit::RateLimit;
use crate::seccomp::ThreadClass;
use crate::vmm::{LiveDisks, LiveSnapshotError, Suspender};

/// A running VM's disks as a live snapshot switches them (implemented by
/// `vmm::LiveDisks`; see `Vm::live_disks`).
pub trait DiskSwitch: Send + Sync {
    /// Switches the disks at `paths` to the overlays now there; returns how
    /// long the guest was paused. An error means no disk switched.
    fn switch_to_overlays(&self, paths: &[PathBuf]) -> Result<Duration, LiveSnapshotError>;
}

impl DiskSwitch for LiveDisks {
    fn switch_to_overlays(&self, paths: &[PathBuf]) -> Result<Duration, LiveSnapshotError> {
        LiveDisks::switch_to_overlays(self, paths)
    }
}

/// The running machine's suspender, if a machine runs (a reboot makes a
/// new one).
pub trait SuspendSource: Send + Sync {
    fn suspender(&self) -> Option<Arc<Suspender>>;
}

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

type PressButton = Box<dyn Fn() -> std::io::Result<()> + Send + Sync>;

/// Everything the control socket answers from.
pub struct ControlContext {
    pub name: String,
    pub started: Instant,
    pub forwards: Vec<ForwardRule>,
    pub power_button: PressButton,
    pub nat: Option<Arc<dyn NatView>>,
    /// The disks a live snapshot switches; None in tests without a VM.
    pub disks: Option<Arc<dyn DiskSwitch>>,
    /// What `vmlab suspend` saves the VM with; None in tests without a VM.
    pub suspender: Option<Arc<dyn SuspendSource>>,
    pub hub: Arc<ConsoleHub>,
    /// Where console clients' keystrokes go (the UART's input pipe); None
    /// when the VM reads its terminal directly.
    pub console_input: Option<Mutex<File>>,
    stopping: AtomicBool,
    /// Connections the listener failed to accept (out of descriptors).
    accept_errors: AtomicU64,
}

impl ControlContext {
    pub fn new(
        name: String,
        forwards: Vec<ForwardRule>,
        power_button: PressButton,
        hub: Arc<ConsoleHub>,
    ) -> Self {
        ControlContext {
            name,
            started: Instant::now(),
            forwards,
            power_button,
            nat: None,
            disks: None,
            suspender: None,
            hub,
            console_input: None,
            stopping: AtomicBool::new(false),
            accept_errors: AtomicU64::new(0),
        }
    }

    /// Whether `vmlab stop` has pressed the power button.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn answer(&self, request: &Request) -> Response {
        match request {
            Request::Status => Response::Status(VmStatus {
                name: self.name.clone(),
                pid: std::process::id(),
                state: if self.stopping.load(Ordering::SeqCst) {
                    "stopping"
                } else {
                    "running"
                }
                .into(),
                uptime_secs: self.started.elapsed().as_secs(),
                forwards: self.forwards.clone(),
                accept_errors: self.accept_errors.load(Ordering::Relaxed),
            }),
            Request::Stop => match (self.power_button)() {
                Ok(()) => {
                    self.stopping.store(true, Ordering::SeqCst);
                    Response::Stopping
                }
                Err(e) => Response::Error {
                    message: format!("cannot press the power button: {e}"),
                },
            },
            Request::Nat => Response::Nat {
                nat: self.nat.as_ref().map(|nat| nat.snapshot()),
            },
            Request::SnapshotDisks { disks } => match &self.disks {
                None => Response::Error {
                    message: "this VM's disks cannot be switched".into(),
                },
                Some(switch) => match switch.switch_to_overlays(disks) {
                    Ok(paused) => {
                        log::info!("live snapshot: the guest paused for {paused:?}");
                        Response::DisksSwitched {
                            paused_us: micros(paused),
                        }
                    }
                    Err(e) => Response::Error {
                        message: e.to_string(),
                    },
                },
            },
            Request::SnapshotFull { disks, state } => {
                match self.suspender.as_ref().and_then(|s| s.suspender()) {
                    None => Response::Error {
                        message: "the guest is rebooting: take the snapshot again once it is up"
                            .into(),
                    },
                    Some(suspender) => match suspender.snapshot(state, disks) {
                        Ok(report) => {
                            log::info!("full snapshot: the guest paused for {:?}", report.paused);
                            Response::FullSnapshotTaken {
                                paused_us: micros(report.paused),
                                ram_bytes: report.written.memory.ram,
                                written_bytes: report.written.memory.written,
                                file_bytes: report.written.file_bytes,
                            }
                        }
                        Err(e) => Response::Error {
                            message: e.to_string(),
                        },
                    },
                }
            }
            // Answered in `suspend`, which must reply before the VM ends.
            Request::Suspend { .. } => Response::Error {
                message: "a suspend is answered by the VM as it ends".into(),
            },
            Request::Console if self.console_input.is_none() => Response::Error {
                message: "its console is the terminal it was started on".into(),
            },
            Request::Console => Response::Console,
        }
    }
}

impl ControlContext {
    /// Saves the VM to `path` and ends it; the answer goes to `stream`
    /// once the state is durable, before the process can exit.
    fn suspend(&self, path: &std::path::Path, stream: &UnixStream) {
        let Some(suspender) = self.suspender.as_ref().and_then(|s| s.suspender()) else {
            reply(
                stream,
                &Response::Error {
                    message: "this VM cannot be suspended now (it is rebooting): try again".into(),
                },
            );
            return;
        };
        let announce = |report: &crate::vmm::SuspendReport| {
            self.stopping.store(true, Ordering::SeqCst);
            log::info!("suspended in {:?}", report.took);
            reply(
                stream,
                &Response::Suspended {
                    ram_bytes: report.written.memory.ram,
                    written_bytes: report.written.memory.written,
                    file_bytes: report.written.file_bytes,
                    took_us: micros(report.took),
                },
            );
        };
        if let Err(e) = suspender.suspend(path, announce) {
            reply(
                stream,
                &Response::Error {
                    message: format!("cannot suspend: {e}"),
                },
            );
        }
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().try_into().unwrap_or(u64::MAX)
}

fn reply(mut stream: &UnixStream, answer: &Response) {
    if let Err(e) = stream.write_all(&encode(answer)) {
        log::warn!("control: cannot answer: {e}");
    }
}

/// Serves `listener` on a background thread for the life of the process;
/// returns once that thread is under its seccomp filter (connection
/// threads inherit it).
pub fn spawn(listener: UnixListener, ctx: Arc<ControlContext>) -> std::io::Result<()> {
    let (filtered, installed) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let result = crate::seccomp::install(ThreadClass::Control);
            let failed = result.is_err();
            let _ = filtered.send(result);
            if failed {
                return;
            }
            let warnings = RateLimit::new(1, Duration::from_secs(60));
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let ctx = ctx.clone();
                        let spawned = std::thread::Builder::new()
                            .name("control-conn".into())
                            .spawn(move || serve(stream, &ctx));
                        if let Err(e) = spawned {
                            log::warn!("control: cannot start a connection thread: {e}");
                        }
                    }
                    Err(e) => {
                        // Out of descriptors, typically: the client waits in
                        // the backlog and is served once some are free.
                        ctx.accept_errors.fetch_add(1, Ordering::Relaxed);
                        if let Some(suppressed) = warnings.admit().admitted() {
                            log::warn!(
                                "control: accept failed: {e} ({suppressed} more since the last \
                                 warning); retrying"
                            );
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })?;
    match installed.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(std::io::Error::other(e)),
        Err(_) => Err(std::io::Error::other(
            "the control thread ended at its start",
        )),
    }
}

/// One connection: a request, its answer, and for `console` the byte
/// stream until the client leaves.
pub(crate) fn serve(stream: UnixStream, ctx: &ControlContext) {
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let answer = match read_message::<Request>(&mut reader) {
        Ok(Request::Suspend { path }) => return ctx.suspend(&path, &stream),
        Ok(request) => {
            log::debug!("control: {request:?}");
            ctx.answer(&request)
        }
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    };
    let mut writer = &stream;
    if writer.write_all(&encode(&answer)).is_err() || answer != Response::Console {
        return;
    }
    let Ok(out) = stream.try_clone() else {
        return;
    };
    let _ = stream.set_read_timeout(None);
    let id = ctx.hub.attach(out);
    // Bytes the reader buffered past the request line are keystrokes too.
    let early = reader.buffer().to_vec();
    let mut input = reader.into_inner();
    if let Some(pipe) = &ctx.console_input {
        let mut chunk = early;
        let mut buf = [0u8; 1024];
        loop {
            if !chunk.is_empty() && lock(pipe).write_all(&chunk).is_err() {
                break;
            }
            match input.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => chunk = buf[..n].to_vec(),
            }
        }
    }
    ctx.hub.detach(id);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::NatSnapshot;
    use std::io::BufRead;
    use std::sync::atomic::AtomicUsize;

    struct FakeNat;
    impl NatView for FakeNat {
        fn snapshot(&self) -> NatSnapshot {
            NatSnapshot {
                forwards: vec!["tcp:127.0.0.1:2222:22".parse().unwrap()],
                ..NatSnapshot::default()
            }
        }
    }

    struct Served {
        _dir: vmm_sys_util::tempdir::TempDir,
        socket: std::path::PathBuf,
        presses: Arc<AtomicUsize>,
        hub: Arc<ConsoleHub>,
        input: File,
    }

    fn serve_fake(with_nat: bool) -> Served {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vmlab-ctl").unwrap();
        let socket = dir.as_path().join("vm.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let presses = Arc::new(AtomicUsize::new(0));
        let counted = presses.clone();
        let hub = ConsoleHub::new(None, false);
        let (input, pipe_w) = nix::unistd::pipe().unwrap();
        let mut ctx = ControlContext::new(
            "vm1".into(),
            vec!["tcp:2222:22".parse().unwrap()],
            Box::new(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }),
            hub.clone(),
        );
        ctx.console_input = Some(Mutex::new(File::from(pipe_w)));
        if with_nat {
            ctx.nat = Some(Arc::new(FakeNat));
        }
        spawn(listener, Arc::new(ctx)).unwrap();
        Served {
            _dir: dir,
            socket,
            presses,
            hub,
            input: File::from(input),
        }
    }

    fn ask(socket: &std::path::Path, raw: &[u8]) -> Response {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream.write_all(raw).unwrap();
        read_message(&mut BufReader::new(stream)).unwrap()
    }

    #[test]
    fn status_stop_and_nat_are_answered() {
        let s = serve_fake(true);
        let Response::Status(status) = ask(&s.socket, &encode(&Request::Status)) else {
            panic!("not a status")
        };
        assert_eq!(status.name, "vm1");
        assert_eq!(status.pid, std::process::id());
        assert_eq!(status.state, "running");
        assert_eq!(status.forwards, ["tcp:127.0.0.1:2222:22".parse().unwrap()]);
        assert_eq!(ask(&s.socket, &encode(&Request::Stop)), Response::Stopping);
        assert_eq!(s.presses.load(Ordering::SeqCst), 1);
        let Response::Status(status) = ask(&s.socket, &encode(&Request::Status)) else {
            panic!("not a status")
        };
        assert_eq!(status.state, "stopping");
        let Response::Nat { nat: Some(nat) } = ask(&s.socket, &encode(&Request::Nat)) else {
            panic!("not a NAT answer")
        };
        assert_eq!(nat.forwards.len(), 1);
    }

    #[test]
    fn a_vm_without_network_answers_nat_with_no_network() {
        let s = serve_fake(false);
        assert_eq!(
            ask(&s.socket, &encode(&Request::Nat)),
            Response::Nat { nat: None }
        );
    }

    #[test]
    fn garbage_gets_an_error_answer_and_the_server_lives_on() {
        let s = serve_fake(false);
        for raw in [&b"hello\n"[..], b"{\"request\":\"explode\"}\n", b"\n"] {
            assert!(
                matches!(ask(&s.socket, raw), Response::Error { .. }),
                "{raw:?}"
            );
        }
        assert!(matches!(
            ask(&s.socket, &encode(&Request::Status)),
            Response::Status(_)
        ));
    }

    #[test]
    fn console_streams_output_and_forwards_input() {
        let mut s = serve_fake(false);
        let mut stream = UnixStream::connect(&s.socket).unwrap();
        // The request and the first keystrokes in one write.
        let mut first = encode(&Request::Console);
        first.extend_from_slice(b"ls\n");
        stream.write_all(&first).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("console"), "{line}");
        let mut typed = [0u8; 3];
        s.input.read_exact(&mut typed).unwrap();
        assert_eq!(&typed, b"ls\n");
        stream.write_all(b"pwd\n").unwrap();
        let mut typed = [0u8; 4];
        s.input.read_exact(&mut typed).unwrap();
        assert_eq!(&typed, b"pwd\n");
        // Output published after attaching reaches the client.
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.hub.clients() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        s.hub.writer().write_all(b"guest says hi").unwrap();
        let mut out = [0u8; 13];
        reader.read_exact(&mut out).unwrap();
        assert_eq!(&out, b"guest says hi");
        drop(reader);
        drop(stream);
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.hub.clients() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(s.hub.clients(), 0, "a client that leaves is detached");
    }
}
