//! Named VMs with a real Linux guest, in the emulated-SVM rig (one L1
//! boot): `run --detach` of two VMs at once, `ps`, the console reached
//! through the control socket and kept in the serial log, `stop` powering
//! the guest off through the ACPI power button, leaving no process and no
//! socket, and `rm`.

mod rig;

use std::sync::OnceLock;
use std::time::Duration;

const LIFECYCLE: &str = r#"
export HOME=$RIG_TMP/home XDG_DATA_HOME=$RIG_TMP/data XDG_RUNTIME_DIR=$RIG_TMP/run
mkdir -p "$HOME"
vms=$XDG_DATA_HOME/vmlab/vms
# Detached VMs leave the scenario's process group: stop them on any exit.
rig_at_exit '"$VMLAB" stop --timeout 5 vm1 vm2 >/dev/null 2>&1'

start() {
    "$VMLAB" run --name "$1" --detach --kernel "$VMLAB_VMLINUX" \
        --initrd "$VMLAB_INITRAMFS" --mem 256M --forward "tcp:$2:22" >"$RIG_OUT/run-$1.out"
}
# Waits until the VM's serial log shows a shell prompt.
wait_prompt() {
    local deadline=$((SECONDS + $2))
    until grep -Eq "root@$1:.*# " "$vms/$1/serial.log" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            echo "rig: no prompt in $1's serial log within $2 s" >&2
            tail -n 20 "$vms/$1/serial.log" >&2 || true
            cat "$vms/$1/vmm.log" >&2 || true
            return 1
        fi
        sleep 0.2
    done
}

start vm1 2222
start vm2 2223
pid1=$(cat "$vms/vm1/vmlab.pid")
pid2=$(cat "$vms/vm2/vmlab.pid")
wait_prompt vm1 300
wait_prompt vm2 300
"$VMLAB" ps >"$RIG_OUT/ps-running.txt"

# The console: keystrokes through the control socket, output back.
rig_console_start con "$VMLAB" console vm1
rig_console_send con 'echo "typed-$((6*7))"'
rig_console_wait con '^typed-42' 120

# The power button: the guest powers off, vmlab ends, the console with it.
"$VMLAB" stop --timeout 240 vm1 >"$RIG_OUT/stop-vm1.out" 2>&1
rig_console_exit con 30 || true
kill -0 "$pid1" 2>/dev/null && echo "vm1_process=alive" || echo "vm1_process=gone"
[ -e "$XDG_RUNTIME_DIR/vmlab/vm1.sock" ] && echo "vm1_socket=left" || echo "vm1_socket=gone"
"$VMLAB" ps >"$RIG_OUT/ps-one-stopped.txt"
"$VMLAB" stop --timeout 240 vm2 >"$RIG_OUT/stop-vm2.out" 2>&1
kill -0 "$pid2" 2>/dev/null && echo "vm2_process=alive" || echo "vm2_process=gone"
[ -e "$XDG_RUNTIME_DIR/vmlab/vm2.sock" ] && echo "vm2_socket=left" || echo "vm2_socket=gone"
cp "$vms/vm1/serial.log" "$RIG_OUT/vm1.serial"
cp "$vms/vm1/vmm.log" "$RIG_OUT/vm1.vmm"
"$VMLAB" rm vm1 vm2
"$VMLAB" ps >"$RIG_OUT/ps-empty.txt"
"#;

fn l1() -> &'static rig::Run {
    static RUN: OnceLock<rig::Run> = OnceLock::new();
    RUN.get_or_init(|| {
        rig::Batch::new("e2e_vms")
            .scenario("lifecycle", Duration::from_secs(15 * 60), LIFECYCLE)
            .run()
    })
}

fn lifecycle() -> &'static rig::Scenario {
    l1().scenario("lifecycle").assert_success()
}

#[test]
fn l1_runs_the_batch() {
    l1().assert_l1_ok();
}

#[test]
fn two_named_vms_run_detached_at_once() {
    let s = lifecycle();
    let ps = s.file("ps-running.txt");
    for (name, port) in [("vm1", 2222), ("vm2", 2223)] {
        let row = ps
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing from ps:\n{ps}\n{}", s.diagnostics()));
        assert!(row.contains("running"), "{row}");
        assert!(row.contains(&format!("tcp:127.0.0.1:{port}:22")), "{row}");
    }
    assert!(
        s.file("run-vm1.out").contains("vmlab console vm1"),
        "{}",
        s.diagnostics()
    );
}

#[test]
fn console_reaches_the_guest_and_the_serial_log_keeps_it() {
    let s = lifecycle();
    assert!(
        s.file("con.console").contains("typed-42"),
        "{}",
        s.diagnostics()
    );
    let serial = s.file("vm1.serial");
    assert!(serial.contains("Linux version"), "boot messages logged");
    assert!(serial.contains("typed-42"), "console session logged");
}

#[test]
fn stop_presses_the_power_button_and_leaves_nothing_running() {
    let s = lifecycle();
    for vm in ["vm1", "vm2"] {
        let out = s.file(&format!("stop-{vm}.out"));
        assert!(
            out.contains(&format!("{vm}: powered off")),
            "the guest powered off on the button, not killed: {out}\n{}",
            s.diagnostics()
        );
        assert_eq!(s.value(&format!("{vm}_process")), "gone");
        assert_eq!(s.value(&format!("{vm}_socket")), "gone");
    }
    assert!(
        s.file("vm1.vmm").contains("guest powered off"),
        "{}",
        s.file("vm1.vmm")
    );
    let ps = s.file("ps-one-stopped.txt");
    let vm1 = ps.lines().find(|l| l.starts_with("vm1")).unwrap();
    let vm2 = ps.lines().find(|l| l.starts_with("vm2")).unwrap();
    assert!(vm1.contains("stopped") && vm2.contains("running"), "{ps}");
    assert_eq!(s.file("ps-empty.txt").lines().count(), 1, "rm removed both");
}
