//! The CLI's config file: named profiles, each a gateway and the session
//! `usher login` stored for it.
//!
//! The file is `$USHER_CLI_CONFIG_FILE`, else `$XDG_CONFIG_HOME/usher/config.toml`,
//! else `~/.config/usher/config.toml`. It holds bearer tokens, so it is
//! written with mode 0600 (its folder 0700), through a temporary file renamed
//! over the old one so a crash never leaves half a file.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The profile used when none is named.
pub const DEFAULT_PROFILE: &str = "default";

/// The gateway used when neither a flag nor the profile names one.
pub const DEFAULT_GATEWAY: &str = "http://127.0.0.1:8080";

/// The whole file.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConfigFile {
    /// Profiles by name.
    pub profiles: BTreeMap<String, Profile>,
}

/// One gateway and the session signed in on it.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Profile {
    /// The gateway's URL, e.g. `https://usher.example.com`.
    pub gateway: String,
    /// The account's slug.
    pub account: String,
    /// The email or username signed in.
    pub login: String,
    /// The session's access token (a bearer credential).
    pub access_token: String,
    /// The session's refresh token.
    pub refresh_token: String,
}

impl Profile {
    /// Whether a session is stored.
    pub fn signed_in(&self) -> bool {
        !self.access_token.is_empty()
    }
}

/// Where the config file lives, from the environment given as a lookup.
pub fn default_path(env: impl Fn(&str) -> Option<String>) -> anyhow::Result<PathBuf> {
    let set = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(file) = set("USHER_CLI_CONFIG_FILE") {
        return Ok(PathBuf::from(file));
    }
    if let Some(dir) = set("XDG_CONFIG_HOME") {
        return Ok(Path::new(&dir).join("usher").join("config.toml"));
    }
    if let Some(home) = set("HOME") {
        return Ok(Path::new(&home)
            .join(".config")
            .join("usher")
            .join("config.toml"));
    }
    anyhow::bail!("no config file location: set USHER_CLI_CONFIG_FILE, XDG_CONFIG_HOME or HOME")
}

/// The config file at `path`, empty when it does not exist.
pub fn load(path: &Path) -> anyhow::Result<ConfigFile> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text)
            .with_context(|| format!("{} is not a valid usher config file", path.display())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `config` to `path`, readable by the owner only.
pub fn save(path: &Path, config: &ConfigFile) -> anyhow::Result<()> {
    let text = toml::to_string_pretty(config).context("encoding the config file")?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_private_dir(dir)?;
    let temporary = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("config.toml"),
        std::process::id()
    ));
    write_private(&temporary, text.as_bytes())
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// Creates `dir` (and its parents) with mode 0700 where missing.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Writes `bytes` to a new or truncated file with mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    // An existing file keeps its mode on open: tighten it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn the_path_follows_the_environment() {
        let explicit = default_path(env(&[
            ("USHER_CLI_CONFIG_FILE", "/x/c.toml"),
            ("HOME", "/h"),
        ]));
        assert_eq!(explicit.expect("path"), PathBuf::from("/x/c.toml"));
        let xdg = default_path(env(&[("XDG_CONFIG_HOME", "/cfg"), ("HOME", "/h")]));
        assert_eq!(xdg.expect("path"), PathBuf::from("/cfg/usher/config.toml"));
        let home = default_path(env(&[("XDG_CONFIG_HOME", ""), ("HOME", "/h")]));
        assert_eq!(
            home.expect("path"),
            PathBuf::from("/h/.config/usher/config.toml")
        );
        assert!(default_path(env(&[])).is_err());
    }

    #[test]
    fn profiles_round_trip_with_a_private_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested").join("config.toml");
        assert_eq!(
            load(&path).expect("missing is empty"),
            ConfigFile::default()
        );
        let mut config = ConfigFile::default();
        config.profiles.insert(
            "staging".into(),
            Profile {
                gateway: "https://usher.example".into(),
                account: "acme".into(),
                login: "ada@example.com".into(),
                access_token: "a".repeat(43),
                refresh_token: "r".repeat(43),
            },
        );
        save(&path, &config).expect("saved");
        save(&path, &config).expect("saved over the old file");
        assert_eq!(load(&path).expect("loaded"), config);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let dir_mode = std::fs::metadata(path.parent().expect("dir"))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(dir_mode & 0o777, 0o700);
        }
    }

    #[test]
    fn a_broken_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "profiles = 3").expect("write");
        let error = load(&path).expect_err("invalid");
        assert!(format!("{error:#}").contains("config.toml"), "{error:#}");
    }
}
