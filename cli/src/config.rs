//! Where the API is and the key to present: `BACKLOG_URL` and `BACKLOG_KEY`
//! from the environment, else `url` and `key` from the config file
//! (`$BACKLOG_CONFIG`, else `$XDG_CONFIG_HOME/backlog/config.toml`, else
//! `~/.config/backlog/config.toml`). The environment wins, field by field.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{CliError, Result};

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
}

/// Where a setting came from, for `backlog config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Env(&'static str),
    File(PathBuf),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Env(name) => write!(f, "${name}"),
            Source::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The key, which nothing prints: its `Debug` and `Display` hide it.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: String) -> ApiKey {
        ApiKey(key)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(…)")
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub url: Option<(String, Source)>,
    pub key: Option<(ApiKey, Source)>,
    /// The config file read, or the one that would be.
    pub file: Option<PathBuf>,
}

/// The config file's path from the environment, by the rules above.
pub fn config_path(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let non_empty = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(path) = non_empty("BACKLOG_CONFIG") {
        return Some(PathBuf::from(path));
    }
    let base = non_empty("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| non_empty("HOME").map(|home| Path::new(&home).join(".config")))?;
    Some(base.join("backlog").join("config.toml"))
}

impl Settings {
    /// Read from the process's environment and the config file.
    pub fn load() -> Result<Settings> {
        Settings::load_from(&|name| std::env::var(name).ok())
    }

    pub fn load_from(env: &dyn Fn(&str) -> Option<String>) -> Result<Settings> {
        Settings::assemble(env, &mut |path| read_file(path))
    }

    /// As [`Settings::load`], for `login`, which writes the file afresh: a
    /// file that cannot be read or parsed counts as empty, and why is
    /// returned to be shown.
    pub fn load_for_login() -> (Settings, Option<CliError>) {
        let mut broken = None;
        let mut lenient = |path: &Path| {
            Ok(read_file(path).unwrap_or_else(|e| {
                broken = Some(e);
                ConfigFile::default()
            }))
        };
        let settings = Settings::assemble(&|name| std::env::var(name).ok(), &mut lenient)
            .expect("a lenient read never fails");
        (settings, broken)
    }

    fn assemble(
        env: &dyn Fn(&str) -> Option<String>,
        read: &mut dyn FnMut(&Path) -> Result<ConfigFile>,
    ) -> Result<Settings> {
        let file = config_path(env);
        let set = |name: &str| env(name).is_some_and(|v| !v.is_empty());
        let from_file = match &file {
            // The environment gives both: the file has nothing to add, and
            // one that does not parse must not stop a command configured
            // without it (`backlog config` included).
            Some(_) if set("BACKLOG_URL") && set("BACKLOG_KEY") => ConfigFile::default(),
            Some(path) => read(path)?,
            None => ConfigFile::default(),
        };
        let pick = |name: &'static str, in_file: Option<String>| {
            env(name)
                .filter(|v| !v.is_empty())
                .map(|v| (v, Source::Env(name)))
                .or_else(|| in_file.zip(file.clone().map(Source::File)))
        };
        Ok(Settings {
            url: pick("BACKLOG_URL", from_file.url),
            key: pick("BACKLOG_KEY", from_file.key).map(|(k, s)| (ApiKey(k), s)),
            file,
        })
    }

    /// The URL and key, or what to set when either is missing.
    pub fn require(&self) -> Result<(String, ApiKey)> {
        let hint = match &self.file {
            Some(path) => format!("or `url` and `key` in {}", path.display()),
            None => "or set BACKLOG_CONFIG to a config file".to_string(),
        };
        let url = self
            .url
            .as_ref()
            .ok_or_else(|| CliError::Config(format!("no API URL: set BACKLOG_URL {hint}")))
            .and_then(|(u, _)| api_url(u))?;
        let key = match &self.key {
            Some((key, source)) => usable_key(key, source)?,
            None => return Err(CliError::Config(format!("no API key: set BACKLOG_KEY {hint}"))),
        };
        Ok((url, key))
    }
}

/// The key as a header can carry it: without the line ends and spaces a
/// file or an `--env-file` saved with CRLF leaves around it (as `login`
/// trims what is pasted), and refused, naming where it came from, if it
/// holds any other character a header cannot carry: sent as it was, the
/// request failed before it left, reported as the API unreachable.
fn usable_key(key: &ApiKey, source: &Source) -> Result<ApiKey> {
    let trimmed = key.expose().trim();
    if trimmed.is_empty() || !trimmed.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CliError::Config(format!(
            "the API key in {source} is empty or holds a character other than visible ASCII \
             (keys are `bk_` and letters and digits); set it again"
        )));
    }
    Ok(ApiKey::new(trimmed.to_string()))
}

/// What `login` and `logout` change in the config file.
pub enum Change<'a> {
    /// Keep this URL and key.
    Login { url: &'a str, key: &'a ApiKey },
    /// Forget the key; the URL stays for the next login.
    Logout,
}

/// Apply `change` to the config file at `path`: the whole file is written
/// beside it and renamed over it, readable by its owner only (it holds a
/// key), so a crash leaves the old file or the new one, never half of one.
/// Returns whether a key was removed, for `logout`.
pub fn save(path: &Path, change: Change<'_>) -> Result<bool> {
    let mut config = match (read_file(path), &change) {
        (Ok(config), _) => config,
        // A login replaces both settings: a file that cannot be read or
        // parsed is written afresh rather than left in the way.
        (Err(_), Change::Login { .. }) => ConfigFile::default(),
        (Err(e), _) => return Err(e),
    };
    let mut removed = false;
    match change {
        Change::Login { url, key } => {
            config.url = Some(url.to_string());
            config.key = Some(key.expose().to_string());
        }
        Change::Logout => removed = config.key.take().is_some(),
    }
    let text = toml::to_string(&config).map_err(|e| CliError::Config(format!("config file: {e}")))?;
    let failed = |what| CliError::file(what, path);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(failed("creating the folder of the config file"))?;
    }
    let partial = path.with_extension("toml.partial");
    // A leftover from a crash may have other permissions; start afresh.
    let _ = std::fs::remove_file(&partial);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&partial)
        .map_err(failed("writing the config file"))?;
    std::io::Write::write_all(&mut file, text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(failed("writing the config file"))?;
    std::fs::rename(&partial, path).map_err(failed("writing the config file"))?;
    Ok(removed)
}

/// The API's base URL as requests join paths to it, or why it is not one.
pub fn api_url(raw: &str) -> Result<String> {
    let url = raw.trim_end_matches('/');
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(CliError::Config(format!(
            "the API URL {url:?} is not an http:// or https:// URL"
        )));
    }
    Ok(url.to_string())
}

fn read_file(path: &Path) -> Result<ConfigFile> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
        Err(e) => return Err(CliError::file("reading the config file", path)(e)),
    };
    toml::from_str(&text).map_err(|e| {
        CliError::Config(format!(
            "config file {}: {}\n(fix it, or `backlog login` writes it afresh)",
            path.display(),
            e.to_string().trim_end()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings> {
        let vars: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::load_from(&|name| vars.get(name).cloned())
    }

    #[test]
    fn the_environment_wins_over_the_file_field_by_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "url = \"http://file:1\"\nkey = \"from-file\"\n").unwrap();
        let path_str = path.to_str().unwrap();
        let s = settings(&[("BACKLOG_CONFIG", path_str), ("BACKLOG_URL", "http://env:2")]).unwrap();
        let (url, key) = s.require().unwrap();
        assert_eq!((url.as_str(), key.expose()), ("http://env:2", "from-file"));
        assert_eq!(s.url.unwrap().1, Source::Env("BACKLOG_URL"));
        assert_eq!(s.key.unwrap().1, Source::File(path.clone()));
    }

    #[test]
    fn a_file_that_does_not_parse_stops_nothing_the_environment_configures_and_a_login_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "url = \"http://a\"\ntoken = \"x\"\n").unwrap();
        let path_str = path.to_str().unwrap();
        let s = settings(&[
            ("BACKLOG_CONFIG", path_str),
            ("BACKLOG_URL", "http://env:2"),
            ("BACKLOG_KEY", "bk_env"),
        ])
        .unwrap();
        let (url, key) = s.require().unwrap();
        assert_eq!((url.as_str(), key.expose()), ("http://env:2", "bk_env"));
        // A setting the file would give: its error is the answer.
        let err = settings(&[("BACKLOG_CONFIG", path_str), ("BACKLOG_URL", "http://env:2")]).unwrap_err();
        assert!(err.to_string().contains("unknown field `token`"), "{err}");

        assert!(
            save(&path, Change::Logout).is_err(),
            "logout keeps the URL: it must read the file"
        );
        let key = ApiKey::new("bk_new".into());
        save(
            &path,
            Change::Login {
                url: "http://b",
                key: &key,
            },
        )
        .unwrap();
        let s = settings(&[("BACKLOG_CONFIG", path_str)]).unwrap();
        let (url, key) = s.require().unwrap();
        assert_eq!((url.as_str(), key.expose()), ("http://b", "bk_new"));
    }

    #[test]
    fn the_file_is_found_under_xdg_then_home() {
        let env = |vars: &[(&str, &str)]| {
            let vars: HashMap<&str, &str> = vars.iter().copied().collect();
            config_path(&|n| vars.get(n).map(|v| v.to_string()))
        };
        assert_eq!(
            env(&[("XDG_CONFIG_HOME", "/x"), ("HOME", "/h")]),
            Some(PathBuf::from("/x/backlog/config.toml"))
        );
        assert_eq!(
            env(&[("HOME", "/h")]),
            Some(PathBuf::from("/h/.config/backlog/config.toml"))
        );
        assert_eq!(env(&[]), None);
    }

    #[test]
    fn missing_settings_and_bad_files_say_what_to_set() {
        let err = settings(&[("HOME", "/nonexistent")])
            .unwrap()
            .require()
            .unwrap_err();
        assert!(err.to_string().contains("set BACKLOG_URL"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "url = \"http://a\"\ntoken = \"x\"\n").unwrap();
        let err = settings(&[("BACKLOG_CONFIG", path.to_str().unwrap())]).unwrap_err();
        assert!(err.to_string().contains("unknown field `token`"), "{err}");
        let err = settings(&[
            ("BACKLOG_URL", "localhost:8787"),
            ("BACKLOG_KEY", "k"),
            ("HOME", "/n"),
        ])
        .unwrap()
        .require()
        .unwrap_err();
        assert!(
            err.to_string().contains("not an http:// or https:// URL"),
            "{err}"
        );
    }

    #[test]
    fn the_key_is_never_in_debug_output() {
        let s = settings(&[("BACKLOG_KEY", "secret-value"), ("HOME", "/n")]).unwrap();
        assert!(!format!("{s:?}").contains("secret-value"));
    }
}
