//! Where the API is and the key to present: `BACKLOG_URL` and `BACKLOG_KEY`
//! from the environment, else `url` and `key` from the config file
//! (`$BACKLOG_CONFIG`, else `$XDG_CONFIG_HOME/backlog/config.toml`, else
//! `~/.config/backlog/config.toml`). The environment wins, field by field.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{CliError, Result};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    url: Option<String>,
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
        let file = config_path(env);
        let from_file = match &file {
            Some(path) => read_file(path)?,
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
            .map(|(u, _)| u.trim_end_matches('/').to_string())
            .ok_or_else(|| CliError::Config(format!("no API URL: set BACKLOG_URL {hint}")))?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(CliError::Config(format!(
                "BACKLOG_URL {url:?} is not an http:// or https:// URL"
            )));
        }
        let key = self
            .key
            .as_ref()
            .map(|(k, _)| k.clone())
            .ok_or_else(|| CliError::Config(format!("no API key: set BACKLOG_KEY {hint}")))?;
        Ok((url, key))
    }
}

fn read_file(path: &Path) -> Result<ConfigFile> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
        Err(e) => return Err(CliError::file("reading the config file", path)(e)),
    };
    toml::from_str(&text).map_err(|e| CliError::Config(format!("config file {}: {e}", path.display())))
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
