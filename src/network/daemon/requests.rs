//! The network socket's connections: each sends one request line and
//! gets one answer, except a join, whose connection becomes the member's
//! port.

use super::*;

impl Process {
    pub(super) fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let id = self.next_conn & TOKEN_INDEX;
                    self.next_conn = self.next_conn.wrapping_add(1);
                    if stream.set_nonblocking(true).is_err()
                        || self.reg.add(stream.as_raw_fd(), TOKEN_CONN | id).is_err()
                    {
                        continue;
                    }
                    self.pending.insert(
                        id,
                        Pending {
                            stream,
                            line: Vec::new(),
                            since: Instant::now(),
                        },
                    );
                    self.read_request(id);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors, typically: the next event retries.
                    log::warn!("network {}: accept: {e}", self.dir.name());
                    return;
                }
            }
        }
    }

    /// Reads what connection `id` sent; acts on a whole request line.
    pub(super) fn read_request(&mut self, id: u32) {
        let Some(conn) = self.pending.get_mut(&id) else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let closed = loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => break true,
                Ok(n) => {
                    conn.line.extend_from_slice(&chunk[..n]);
                    if conn.line.contains(&b'\n') || conn.line.len() > MAX_LINE {
                        break false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        };
        let Some(conn) = self.pending.remove(&id) else {
            return;
        };
        let _ = self.reg.remove(conn.stream.as_raw_fd(), TOKEN_CONN | id);
        if closed && !conn.line.contains(&b'\n') {
            return;
        }
        let end = conn
            .line
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(conn.line.len());
        let request = serde_json::from_slice::<NetRequest>(&conn.line[..end])
            .map_err(|e| format!("malformed request: {e}"));
        let answer = match request {
            Ok(NetRequest::Join(join)) => match self.join(&join) {
                Ok((joined, port)) => {
                    self.become_member(conn.stream, port, &join, joined);
                    return;
                }
                Err(message) => NetResponse::Error { message },
            },
            Ok(NetRequest::Status) => NetResponse::Status(self.view()),
            Ok(NetRequest::MemberNat { name }) => match self.member_named(&name) {
                Some(m) => NetResponse::Nat {
                    nat: self.nat.snapshot_of(m.ip),
                },
                None => NetResponse::Error {
                    message: format!("{name} is not a member"),
                },
            },
            Ok(NetRequest::Attach(attach)) => match self.attach(&attach) {
                Ok(view) => NetResponse::Attached(view),
                Err(message) => NetResponse::Error { message },
            },
            Ok(NetRequest::Detach { netns }) => match self.detach(&netns) {
                Ok(()) => NetResponse::Detached,
                Err(message) => NetResponse::Error { message },
            },
            Err(message) => NetResponse::Error { message },
        };
        answer_and_close(conn.stream, &answer);
    }

    pub(super) fn expire_pending(&mut self) {
        let late: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, c)| c.since.elapsed() > REQUEST_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if let Some(conn) = self.pending.remove(&id) {
                let _ = self.reg.remove(conn.stream.as_raw_fd(), TOKEN_CONN | id);
            }
        }
    }
}

pub(super) fn write_line(mut stream: &UnixStream, answer: &NetResponse) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(&encode(answer))
}

fn answer_and_close(stream: UnixStream, answer: &NetResponse) {
    let _ = write_line(&stream, answer);
}
