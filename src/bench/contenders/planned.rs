//! A contender that cannot run yet because vmlab lacks what it needs: it
//! stays in every table and chart as missing, with the reason.

use crate::bench::contender::{Contender, Description, Goal, Missing, Role, Sample, SampleError};

pub struct Planned {
    id: &'static str,
    label: &'static str,
    goal: Goal,
    role: Role,
    needs: &'static str,
}

impl Planned {
    pub fn new(
        id: &'static str,
        label: &'static str,
        goal: Goal,
        role: Role,
        needs: &'static str,
    ) -> Self {
        Planned {
            id,
            label,
            goal,
            role,
            needs,
        }
    }

    /// The ssh-ready contenders, until virtio-net, the NAT and the Debian
    /// guest exist.
    pub fn ssh_ready() -> Vec<Planned> {
        const NEEDS: &str =
            "needs virtio-net behind the user-mode NAT with port forwards and the Debian guest with sshd (not in vmlab yet)";
        vec![
            Planned::new(
                "vmlab-ssh",
                "vmlab → ssh-ready",
                Goal::SshReady,
                Role::Vmlab,
                NEEDS,
            ),
            Planned::new(
                "qemu-microvm-ssh",
                "QEMU microvm → ssh-ready",
                Goal::SshReady,
                Role::Qemu,
                "needs the Debian guest image with sshd (not in vmlab yet)",
            ),
            Planned::new(
                "runc-sshd",
                "runc → sshd answering",
                Goal::SshReady,
                Role::Container,
                "needs the Debian root filesystem with sshd (not in vmlab yet)",
            ),
        ]
    }
}

impl Contender for Planned {
    fn describe(&self) -> Description {
        let phase = format!("start to {}", self.goal.name());
        Description::new(self.id, self.label, self.goal, self.role, &[&phase])
    }
    fn prepare(&mut self) -> Result<(), Missing> {
        Err(Missing(self.needs.to_string()))
    }
    fn sample(&mut self) -> Result<Sample, SampleError> {
        Err(SampleError::new(self.needs))
    }
}
