//! A fast local SMTP sink: speaks enough ESMTP for lettre (EHLO, MAIL, RCPT,
//! DATA, RSET, NOOP, QUIT), keeps no message, only counts them, notes when
//! each arrived and keeps the invitation token of each link it sees.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
    time::Instant,
};

#[derive(Debug, Default)]
struct State {
    count: AtomicU64,
    /// Recipient → the token of the last invitation link sent to it.
    tokens: Mutex<HashMap<String, String>>,
    /// Arrival time of every message, in order.
    arrivals: Mutex<Vec<Instant>>,
}

/// The sink; stops when dropped.
#[derive(Debug)]
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
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(State::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(session(stream, shared.clone()));
            }
        });
        Ok(Self { port, state, task })
    }

    /// Messages accepted so far.
    pub fn count(&self) -> u64 {
        self.state.count.load(Ordering::SeqCst)
    }

    /// The invitation token last mailed to `address` (lower case), if any.
    pub fn token_for(&self, address: &str) -> Option<String> {
        self.state
            .tokens
            .lock()
            .ok()
            .and_then(|tokens| tokens.get(address).cloned())
    }

    /// Arrival times of messages `from..` (by arrival order).
    pub fn arrivals_since(&self, from: usize) -> Vec<Instant> {
        self.state
            .arrivals
            .lock()
            .map(|a| a.get(from..).map(<[Instant]>::to_vec).unwrap_or_default())
            .unwrap_or_default()
    }
}

/// The address inside `<…>` (or the whole argument), lower-cased.
fn angle(argument: &str) -> String {
    let start = argument.find('<').map_or(0, |i| i + 1);
    let end = argument.rfind('>').unwrap_or(argument.len());
    argument
        .get(start..end)
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// The token of the first `…/invite?token=<token>` link in `line`.
pub fn invite_token(line: &str) -> Option<String> {
    const MARK: &str = "/invite?token=";
    let start = line.find(MARK)? + MARK.len();
    let token: String = line[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    (!token.is_empty()).then_some(token)
}

/// The invitation token in the text part of raw message `data` (whatever
/// its transfer encoding).
pub fn message_token(data: &[u8]) -> Option<String> {
    let message = mail_parser::MessageParser::default().parse(data)?;
    let text = message.body_text(0)?;
    invite_token(&text)
}

async fn session(stream: TcpStream, state: Arc<State>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    if write.write_all(b"220 sink ESMTP\r\n").await.is_err() {
        return;
    }
    let mut to: Vec<String> = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let command = line.trim_end();
        let upper = command.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            b"250-sink\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            to.clear();
            b"250 2.1.0 ok\r\n"
        } else if upper.starts_with("RCPT TO:") {
            to.push(angle(command.get(8..).unwrap_or_default()));
            b"250 2.1.5 ok\r\n"
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
                let token = message_token(&data);
                state.count.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut arrivals) = state.arrivals.lock() {
                    arrivals.push(Instant::now());
                }
                if let Some(token) = token
                    && let Ok(mut tokens) = state.tokens.lock()
                {
                    for address in to.drain(..) {
                        tokens.insert(address, token.clone());
                    }
                }
                to.clear();
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

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use tokio::io::AsyncReadExt;

    use super::*;

    #[test]
    fn tokens_are_cut_from_links() {
        assert_eq!(
            invite_token("Open https://x.example/invite?token=Ab-c_9 now").as_deref(),
            Some("Ab-c_9")
        );
        assert_eq!(invite_token("no link here"), None);
        assert_eq!(invite_token("https://x.example/invite?token="), None);
    }

    #[tokio::test]
    async fn a_message_is_counted_and_its_token_kept() {
        let sink = SmtpSink::start().await.unwrap();
        let mut stream = TcpStream::connect(("127.0.0.1", sink.port)).await.unwrap();
        let script = "EHLO me\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<Ivy@X.example>\r\nDATA\r\n\
                      Subject: hi\r\nContent-Type: text/plain\r\n\
                      Content-Transfer-Encoding: quoted-printable\r\n\r\nHello\r\n\
                      Go to https://u.example/invite?token=3DTok_en-1=\r\n23 please\r\n.\r\nQUIT\r\n";
        stream.write_all(script.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.contains("250 2.0.0 queued"), "{answer}");
        assert_eq!(sink.count(), 1);
        assert_eq!(
            sink.token_for("ivy@x.example").as_deref(),
            Some("Tok_en-123")
        );
        assert_eq!(sink.arrivals_since(0).len(), 1);
        assert!(sink.arrivals_since(5).is_empty());
    }
}
