//! A small SMTP server for tests: speaks enough ESMTP for lettre (EHLO, MAIL,
//! RCPT, DATA, RSET, NOOP, QUIT), records every accepted message, answers 550
//! to chosen recipients, and can refuse every connection (an outage).

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// One accepted message.
#[derive(Clone, Debug)]
pub struct Received {
    /// `MAIL FROM`.
    pub from: String,
    /// Every accepted `RCPT TO`.
    pub to: Vec<String>,
    /// The raw message (dot-unstuffed, CRLF line ends).
    pub data: Vec<u8>,
}

#[derive(Default)]
struct State {
    messages: Mutex<Vec<Received>>,
    rejected: Mutex<HashSet<String>>,
    refusing: AtomicBool,
    refused_connections: AtomicUsize,
}

/// The sink; stops when dropped.
pub struct SmtpSink {
    /// Its port on 127.0.0.1.
    pub port: u16,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SmtpSink {
    /// Listens on a free port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(State::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if shared.refusing.load(Ordering::SeqCst) {
                    shared.refused_connections.fetch_add(1, Ordering::SeqCst);
                    drop(stream);
                    continue;
                }
                tokio::spawn(session(stream, shared.clone()));
            }
        });
        Self { port, state, task }
    }

    /// Answers `550` to `RCPT TO:<address>`.
    pub fn reject_recipient(&self, address: &str) {
        self.state
            .rejected
            .lock()
            .expect("lock")
            .insert(address.to_ascii_lowercase());
    }

    /// Accepts `address` again (the mailbox was fixed).
    pub fn accept_recipient(&self, address: &str) {
        self.state
            .rejected
            .lock()
            .expect("lock")
            .remove(&address.to_ascii_lowercase());
    }

    /// Refuses (drops) every connection and every command while `refusing`.
    pub fn set_refusing(&self, refusing: bool) {
        self.state.refusing.store(refusing, Ordering::SeqCst);
    }

    /// Connections dropped while refusing.
    pub fn refused_connections(&self) -> usize {
        self.state.refused_connections.load(Ordering::SeqCst)
    }

    /// The messages accepted so far.
    pub fn messages(&self) -> Vec<Received> {
        self.state.messages.lock().expect("lock").clone()
    }

    /// How many messages were accepted.
    pub fn count(&self) -> usize {
        self.state.messages.lock().expect("lock").len()
    }
}

fn angle(argument: &str) -> String {
    let start = argument.find('<').map_or(0, |i| i + 1);
    let end = argument.rfind('>').unwrap_or(argument.len());
    argument
        .get(start..end)
        .unwrap_or_default()
        .to_ascii_lowercase()
}

async fn session(stream: TcpStream, state: Arc<State>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    if write.write_all(b"220 sink ESMTP\r\n").await.is_err() {
        return;
    }
    let mut from = String::new();
    let mut to = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if state.refusing.load(Ordering::SeqCst) {
            state.refused_connections.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let command = line.trim_end().to_owned();
        let upper = command.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            b"250-sink\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            from = angle(&command[10..]);
            to.clear();
            b"250 2.1.0 ok\r\n"
        } else if upper.starts_with("RCPT TO:") {
            let address = angle(&command[8..]);
            if state.rejected.lock().expect("lock").contains(&address) {
                b"550 5.1.1 mailbox unavailable\r\n"
            } else {
                to.push(address);
                b"250 2.1.5 ok\r\n"
            }
        } else if upper == "DATA" {
            if to.is_empty() {
                b"554 5.5.1 no valid recipients\r\n"
            } else {
                if write.write_all(b"354 go ahead\r\n").await.is_err() {
                    return;
                }
                let mut data = Vec::new();
                loop {
                    let mut body_line = String::new();
                    match lines.read_line(&mut body_line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if body_line == ".\r\n" || body_line == ".\n" {
                        break;
                    }
                    let unstuffed = body_line.strip_prefix('.').unwrap_or(&body_line);
                    data.extend_from_slice(unstuffed.as_bytes());
                }
                state.messages.lock().expect("lock").push(Received {
                    from: from.clone(),
                    to: std::mem::take(&mut to),
                    data,
                });
                b"250 2.0.0 queued\r\n"
            }
        } else if upper == "RSET" {
            to.clear();
            b"250 2.0.0 ok\r\n"
        } else if upper == "NOOP" {
            b"250 2.0.0 ok\r\n"
        } else if upper == "QUIT" {
            let _ = write.write_all(b"221 2.0.0 bye\r\n").await;
            return;
        } else {
            b"502 5.5.2 not implemented\r\n"
        };
        if write.write_all(reply).await.is_err() {
            return;
        }
    }
}
