//! Turning a rendered email into a MIME message and handing it to lettre:
//! SMTP (pooled, with TLS options and timeouts) or, for `usher dev`, `.eml`
//! files in a folder. Failures are classified: a 5xx answer is permanent,
//! everything else (4xx, refused or dropped connections, timeouts, a full
//! disk) is transient and retried.

use std::{sync::Arc, time::Duration};

use lettre::{
    AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    message::{Mailbox, MultiPart},
    transport::smtp::{PoolConfig, authentication::Credentials},
};

use tokio::sync::Semaphore;

use crate::{
    config::{SmtpConfig, TlsMode, TransportKind},
    templates::{RenderedEmail, clean},
};

/// Why an email was not handed over.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Retrying may work (4xx, connection trouble, timeout).
    #[error("{0}")]
    Transient(String),
    /// Retrying will not work (5xx, an unusable address).
    #[error("{0}")]
    Permanent(String),
}

/// Where emails go.
#[derive(Clone)]
pub enum Mailer {
    /// An SMTP server: pooled connections, and a permit per send so that no
    /// more are in flight than the pool holds (lettre opens an extra,
    /// unpooled connection when the pool is empty, then closes it: a
    /// connection per email under load).
    Smtp(AsyncSmtpTransport<Tokio1Executor>, Arc<Semaphore>),
    /// A folder of `.eml` files.
    File(AsyncFileTransport<Tokio1Executor>),
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Smtp(..) => "Mailer::Smtp",
            Self::File(_) => "Mailer::File",
        })
    }
}

impl Mailer {
    /// The transport `config` describes (the folder is created when missing).
    pub fn from_config(config: &SmtpConfig) -> anyhow::Result<Self> {
        Ok(match config.transport {
            TransportKind::File => {
                std::fs::create_dir_all(&config.folder)?;
                Self::File(AsyncFileTransport::new(&config.folder))
            }
            TransportKind::Smtp => {
                let host = config.host.trim();
                let builder = match config.tls {
                    TlsMode::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host),
                    TlsMode::Starttls => {
                        AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(host)?
                    }
                    TlsMode::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(host)?,
                };
                let pool = config.pool_max_size.max(1);
                let mut builder = builder
                    .port(config.port)
                    .timeout(Some(config.timeout()))
                    .pool_config(PoolConfig::new().max_size(pool));
                if !config.username.is_empty() {
                    builder = builder.credentials(Credentials::new(
                        config.username.clone(),
                        config.password.expose().to_owned(),
                    ));
                }
                let permits = usize::try_from(pool).unwrap_or(usize::MAX);
                Self::Smtp(builder.build(), Arc::new(Semaphore::new(permits)))
            }
        })
    }

    /// Sends `message`, waiting at most `wait` for a free SMTP connection
    /// (a transient failure when none came, so the job is retried later).
    pub async fn send(&self, message: Message, wait: Duration) -> Result<(), SendError> {
        match self {
            Self::Smtp(smtp, permits) => {
                let _permit = tokio::time::timeout(wait, permits.acquire())
                    .await
                    .map_err(|_| {
                        SendError::Transient("smtp: no connection free within the lease".into())
                    })?
                    .map_err(|_| SendError::Transient("smtp: transport closed".into()))?;
                smtp.send(message).await.map(drop).map_err(|error| {
                    let text = smtp_reason(&error);
                    if error.is_permanent() {
                        SendError::Permanent(text)
                    } else {
                        SendError::Transient(text)
                    }
                })
            }
            Self::File(file) => file
                .send(message)
                .await
                .map(drop)
                .map_err(|error| SendError::Transient(format!("mail folder: {error}"))),
        }
    }
}

/// The server's answer (code and text) or the kind of failure, without
/// anything of the message itself.
fn smtp_reason(error: &lettre::transport::smtp::Error) -> String {
    match error.status() {
        Some(code) => format!("smtp {code}: {error}"),
        None => format!("smtp: {error}"),
    }
}

/// The deterministic `Message-ID` of a job: a resent copy of a job carries
/// the same id, so receiving systems can drop it.
pub fn message_id(job_id: &str, host: &str) -> String {
    format!("<{job_id}@{host}>")
}

/// Builds the MIME message (multipart/alternative, text then HTML).
pub fn build(
    from: &Mailbox,
    to_email: &str,
    to_name: &str,
    message_id: String,
    email: &RenderedEmail,
) -> Result<Message, SendError> {
    let address = to_email
        .parse::<lettre::Address>()
        .map_err(|_| SendError::Permanent("recipient address unusable".into()))?;
    let name = clean(to_name);
    let to = Mailbox::new((!name.is_empty()).then_some(name), address);
    Message::builder()
        .from(from.clone())
        .to(to)
        .subject(email.subject.clone())
        .message_id(Some(message_id))
        .multipart(MultiPart::alternative_plain_html(
            email.text.clone(),
            email.html.clone(),
        ))
        .map_err(|error| SendError::Permanent(format!("message not buildable: {error}")))
}
