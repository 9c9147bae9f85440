//! The TOML config file: the same model as the seed syntax, one table per chardev and watchdog.
//!
//! ```toml
//! [chardev.detection]
//! host = "0.0.0.0"
//! port = 9009
//! server = true
//!
//! [chardev.notification]
//! host = "127.0.0.1"
//! port = 4445
//!
//! [watchdog.awd1]
//! awd_node = "detection"
//! notification_node = "notification"
//! script = ["quit"]          # or opt_script = "path", relative to this file
//! pulse_interval = 1000      # milliseconds
//! timeout = 5000             # milliseconds
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::{ConfigError, RawChardev, RawConfig, RawObject, RawWatchdog};

/// The file's top level.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    chardev: BTreeMap<String, RawChardev>,
    #[serde(default)]
    watchdog: BTreeMap<String, RawWatchdog>,
}

/// Parses TOML text; `path` names it in errors and anchors relative script paths.
pub fn parse(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    let shown = path.display().to_string();
    let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError::FileParse {
        path: shown.clone(),
        msg: one_line(&e),
    })?;
    let mut raw = RawConfig {
        base_dir: path.parent().map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
            .to_owned()
        }),
        ..RawConfig::default()
    };
    for (id, mut c) in file.chardev {
        c.origin = format!("{shown}: [chardev.{id}]");
        c.id = id;
        raw.chardevs.push(c);
    }
    for (id, mut w) in file.watchdog {
        w.origin = format!("{shown}: [watchdog.{id}]");
        w.id = id;
        raw.objects.push(RawObject::Watchdog(w));
    }
    Ok(raw)
}

/// Reads and parses a TOML config file.
pub fn load(path: &Path) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::FileRead {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, path)
}

/// toml's errors span several lines with a source excerpt; keep the location and the message.
fn one_line(e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => format!("{msg} (at byte {})", span.start),
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Role};
    use std::time::Duration;

    #[test]
    fn the_module_example_builds_the_same_model_as_the_seed_syntax() {
        let text = "[chardev.detection]\nhost = \"0.0.0.0\"\nport = 9009\nserver = true\n\n\
            [chardev.notification]\nhost = \"127.0.0.1\"\nport = 4445\n\n\
            [watchdog.awd1]\nawd_node = \"detection\"\nnotification_node = \"notification\"\n\
            script = [\"quit\"]\npulse_interval = 1000\ntimeout = 5000\n";
        let from_file = Config::build(parse(text, Path::new("awd.toml")).unwrap()).unwrap();
        let mut raw = RawConfig::default();
        raw.add_seed_args(
            &[
                "socket,id=detection,host=0.0.0.0,port=9009,server,nowait".into(),
                "socket,id=notification,host=127.0.0.1,port=4445".into(),
            ],
            &["advanced-watchdog,id=awd1,awd_node=detection,notification_node=notification,pulse_interval=1000,timeout=5000".into()],
        )
        .unwrap();
        let from_seed = Config::build(raw).unwrap();
        assert_eq!(from_file.chardevs, from_seed.chardevs);
        let (a, b) = (&from_file.watchdogs[0], &from_seed.watchdogs[0]);
        assert_eq!(
            (a.role, a.timeout(), a.pulse_interval),
            (
                Role::Server,
                Duration::from_secs(5),
                Some(Duration::from_secs(1))
            )
        );
        assert_eq!(
            (a.role, a.timeout(), a.pulse_interval),
            (b.role, b.timeout(), b.pulse_interval)
        );
        assert_eq!(a.script.lines.len(), 1);
    }

    #[test]
    fn unknown_keys_and_bad_types_are_one_line_errors_naming_the_key() {
        let err = parse("[watchdog.a]\ntimeot = 5\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.toml") && err.contains("timeot"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        let err = parse("[chardev.a]\nport = \"x\"\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.toml"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn relative_opt_script_paths_resolve_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s"), "quit\n").unwrap();
        let path = dir.path().join("awd.toml");
        std::fs::write(&path, "[chardev.a]\npath = \"/tmp/x\"\nserver = true\n[chardev.m]\npath = \"/tmp/m\"\n\
            [watchdog.w]\nawd_node = \"a\"\nnotification_node = \"m\"\nopt_script = \"s\"\ntimeout = 100\n").unwrap();
        let cfg = Config::build(load(&path).unwrap()).unwrap();
        assert_eq!(cfg.watchdogs[0].script.lines[0].text, "quit");
    }
}
