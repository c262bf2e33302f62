//! Announces each email the notification service writes to the mail folder:
//! its recipient, subject and the links it carries (invitation and
//! password-reset links), so a newcomer can open them from the terminal.
//!
//! The folder is polled. A file is read once its size and modification time
//! have not changed between two polls, so a file still being written is
//! never read half-way.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    time::SystemTime,
};

use mail_parser::MessageParser;

use crate::output::line;

/// One email found in the folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email {
    /// The file.
    pub path: PathBuf,
    /// The recipients' addresses.
    pub to: Vec<String>,
    /// The subject.
    pub subject: String,
    /// The links to the public base URL found in the text.
    pub links: Vec<String>,
}

/// Watches a mail folder.
#[derive(Debug)]
pub struct MailWatcher {
    folder: PathBuf,
    base: String,
    seen: HashSet<PathBuf>,
    pending: HashMap<PathBuf, (u64, Option<SystemTime>)>,
}

impl MailWatcher {
    /// A watcher of `folder` that ignores the emails already there.
    pub fn new(folder: &Path, base: &str) -> Self {
        let mut watcher = Self {
            folder: folder.to_path_buf(),
            base: base.trim_end_matches('/').to_owned(),
            seen: HashSet::new(),
            pending: HashMap::new(),
        };
        watcher.seen = watcher.files().into_iter().map(|(p, _)| p).collect();
        watcher
    }

    fn files(&self) -> Vec<(PathBuf, (u64, Option<SystemTime>))> {
        let Ok(entries) = std::fs::read_dir(&self.folder) else {
            return Vec::new();
        };
        let mut files: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .filter_map(|p| {
                let meta = std::fs::metadata(&p).ok()?;
                Some((p, (meta.len(), meta.modified().ok())))
            })
            .collect();
        files.sort();
        files
    }

    /// The emails that appeared and settled since the last call.
    pub fn poll(&mut self) -> Vec<Email> {
        let mut found = Vec::new();
        for (path, stamp) in self.files() {
            if self.seen.contains(&path) {
                continue;
            }
            if self.pending.get(&path) == Some(&stamp) && stamp.0 > 0 {
                self.pending.remove(&path);
                self.seen.insert(path.clone());
                if let Ok(bytes) = std::fs::read(&path) {
                    found.push(read(&path, &bytes, &self.base));
                }
            } else {
                self.pending.insert(path, stamp);
            }
        }
        found
    }
}

/// Reads an email's recipients, subject and links.
pub fn read(path: &Path, bytes: &[u8], base: &str) -> Email {
    let parsed = MessageParser::default().parse(bytes);
    let to = parsed
        .as_ref()
        .and_then(|m| m.to())
        .map(|to| {
            to.iter()
                .filter_map(|a| a.address())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let subject = parsed
        .as_ref()
        .and_then(|m| m.subject())
        .unwrap_or_default()
        .to_owned();
    let text = parsed
        .as_ref()
        .and_then(|m| m.body_text(0))
        .map(|t| t.into_owned())
        .unwrap_or_default();
    Email {
        path: path.to_path_buf(),
        to,
        subject,
        links: links(&text, base),
    }
}

/// The distinct links in `text` that start with `base`, in order.
pub fn links(text: &str, base: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let prefix = format!("{}/", base.trim_end_matches('/'));
    let mut rest = text;
    while let Some(start) = rest.find(&prefix) {
        let candidate = &rest[start..];
        let end = candidate
            .find(|c: char| c.is_whitespace() || matches!(c, '<' | '>' | '"' | '\'' | ')'))
            .unwrap_or(candidate.len());
        let link = candidate[..end].trim_end_matches(['.', ',']);
        if !found.iter().any(|l| l == link) {
            found.push(link.to_owned());
        }
        rest = &candidate[end..];
    }
    found
}

/// Prints an email's recipient, subject and links on stdout.
pub fn announce(email: &Email) {
    let to = if email.to.is_empty() {
        "(no recipient)".to_owned()
    } else {
        email.to.join(", ")
    };
    line(format!("usher dev: email to {to}: {}", email.subject));
    for link in &email.links {
        line(format!("  link: {link}"));
    }
    line(format!("  file: {}", email.path.display()));
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "http://127.0.0.1:8080";

    fn eml(to: &str, link: &str) -> String {
        format!(
            "From: Usher <no-reply@usher.localhost>\r\nTo: {to}\r\nSubject: You are invited\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\r\nJo invited you.\r\n\
             Accept: {link}\r\nSee {link}.\r\nOther: https://elsewhere.example/x\r\n"
        )
    }

    #[test]
    fn recipient_subject_and_links_are_read() {
        let link = format!("{BASE}/invite?token=abc_DEF-123");
        let email = read(
            Path::new("x.eml"),
            eml("Ivy <ivy@example.com>", &link).as_bytes(),
            BASE,
        );
        assert_eq!(email.to, ["ivy@example.com"]);
        assert_eq!(email.subject, "You are invited");
        assert_eq!(email.links, [link]);
    }

    #[test]
    fn links_end_at_spaces_brackets_and_sentence_ends() {
        let text = format!("<a href=\"{BASE}/reset?token=t1\">go</a> or ({BASE}/invite?token=t2).");
        assert_eq!(
            links(&text, &format!("{BASE}/")),
            [
                format!("{BASE}/reset?token=t1"),
                format!("{BASE}/invite?token=t2")
            ]
        );
        assert!(links("nothing here", BASE).is_empty());
    }

    #[test]
    fn only_new_settled_files_are_reported_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("old.eml"), eml("old@example.com", BASE)).expect("write");
        let mut watcher = MailWatcher::new(dir.path(), BASE);
        assert!(watcher.poll().is_empty(), "old emails are not announced");
        let link = format!("{BASE}/invite?token=t");
        std::fs::write(dir.path().join("new.eml"), eml("new@example.com", &link)).expect("write");
        std::fs::write(dir.path().join("notes.txt"), "not an email").expect("write");
        assert!(watcher.poll().is_empty(), "first seen: not yet settled");
        let found = watcher.poll();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].to, ["new@example.com"]);
        assert_eq!(found[0].links, [link]);
        assert!(watcher.poll().is_empty(), "announced once");
    }
}
