//! The seed's QEMU option syntax: `-chardev socket,id=x,host=…` and `-object
//! advanced-watchdog,id=…`.
//!
//! QEMU's rules are kept: the first element is the backend or object type, `,,` is a literal
//! comma inside a value, booleans are `on|off` (also `yes|no|true|false`), and the legacy bare
//! words `server`, `nowait`, `nodelay` mean `server=on`, `wait=off`, `nodelay=on`. A list is
//! a repeated key, as in QEMU's `-numa node,cpus=0,cpus=2`: `peers=10.0.0.0/8,peers=::1`.

use super::{ConfigError, RawChardev, RawObject, RawWatchdog};

/// Splits a QEMU option string into its elements, honouring `,,` as an escaped comma.
fn split(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// One `key=value` pair, or a bare word with its QEMU meaning.
fn key_value(arg: &str, elem: &str) -> Result<(String, String), ConfigError> {
    match elem.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        Some(_) => Err(ConfigError::syntax(arg, format!("empty key in '{elem}'"))),
        None => match elem {
            "server" => Ok(("server".into(), "on".into())),
            "nowait" => Ok(("wait".into(), "off".into())),
            "wait" => Ok(("wait".into(), "on".into())),
            "nodelay" => Ok(("nodelay".into(), "on".into())),
            "" => Err(ConfigError::syntax(arg, "empty element (stray comma?)")),
            other => Err(ConfigError::syntax(
                arg,
                format!("'{other}' is not key=value"),
            )),
        },
    }
}

fn parse_bool(arg: &str, key: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(ConfigError::syntax(
            arg,
            format!("{key}={v}: expected on or off"),
        )),
    }
}

fn parse_u64(arg: &str, key: &str, v: &str) -> Result<u64, ConfigError> {
    v.parse::<u64>()
        .map_err(|_| ConfigError::syntax(arg, format!("{key}={v}: expected a whole number")))
}

fn parse_u32(arg: &str, key: &str, v: &str) -> Result<u32, ConfigError> {
    v.parse::<u32>().map_err(|_| {
        ConfigError::syntax(
            arg,
            format!("{key}={v}: expected a whole number up to {}", u32::MAX),
        )
    })
}

/// Parses one `--chardev` argument.
pub fn parse_chardev(arg: &str) -> Result<RawChardev, ConfigError> {
    let elems = split(arg);
    let backend = elems[0].clone();
    if backend.is_empty() || backend.contains('=') {
        return Err(ConfigError::syntax(
            arg,
            "must start with the backend type, e.g. 'socket,'",
        ));
    }
    let mut c = RawChardev {
        backend,
        origin: format!("--chardev {arg}"),
        ..RawChardev::default()
    };
    let mut id = None;
    for elem in &elems[1..] {
        let (k, v) = key_value(arg, elem)?;
        match k.as_str() {
            "id" => id = Some(v),
            "host" => c.host = Some(v),
            "port" => {
                c.port = Some(v.parse::<u32>().map_err(|_| {
                    ConfigError::syntax(arg, format!("port={v}: expected a port number"))
                })?)
            }
            "path" => c.path = Some(v.into()),
            "server" => c.server = Some(parse_bool(arg, &k, &v)?),
            "wait" => c.wait = Some(parse_bool(arg, &k, &v)?),
            "nodelay" => c.nodelay = Some(parse_bool(arg, &k, &v)?),
            "reconnect" => c.reconnect = Some(parse_u64(arg, &k, &v)?),
            "guest-cid" => c.guest_cid = Some(parse_u64(arg, &k, &v)?),
            "max-connections" => c.max_connections = Some(parse_u32(arg, &k, &v)?),
            "peers" => c.peers.get_or_insert_with(Vec::new).push(v),
            "tcp-user-timeout" => c.tcp_user_timeout = Some(parse_u64(arg, &k, &v)?),
            "rate-limit" => c.rate_limit = Some(parse_u32(arg, &k, &v)?),
            "peer-uid" | "peer_uid" => c.peer_uid = Some(parse_u32(arg, &k, &v)?),
            "psk" => c.psk_file = Some(v.into()),
            "peer-gid" | "peer_gid" => c.peer_gid = Some(parse_u32(arg, &k, &v)?),
            "port-vsock" | "vsock-port" => {
                return Err(ConfigError::syntax(
                    arg,
                    format!("unknown key '{k}' (use port=)"),
                ));
            }
            _ => return Err(ConfigError::syntax(arg, format!("unknown key '{k}'"))),
        }
    }
    c.id = id.ok_or_else(|| ConfigError::syntax(arg, "missing id="))?;
    Ok(c)
}

/// Parses one `--object` argument.
pub fn parse_object(arg: &str) -> Result<RawObject, ConfigError> {
    let elems = split(arg);
    let kind = elems[0].as_str();
    let mut pairs = Vec::new();
    for elem in &elems[1..] {
        pairs.push(key_value(arg, elem)?);
    }
    match kind {
        "iothread" => {
            let id = pairs
                .iter()
                .find(|(k, _)| k == "id")
                .map(|(_, v)| v.clone());
            Ok(RawObject::Ignored {
                kind: "iothread".into(),
                id: id.unwrap_or_default(),
            })
        }
        "advanced-watchdog" => {
            let mut w = RawWatchdog {
                origin: format!("--object {arg}"),
                ..RawWatchdog::default()
            };
            let mut id = None;
            for (k, v) in pairs {
                match k.as_str() {
                    "id" => id = Some(v),
                    "server" => w.server = Some(parse_bool(arg, &k, &v)?),
                    "awd_node" => w.awd_node = Some(v),
                    "notification_node" => w.notification_node = Some(v),
                    "opt_script" => w.opt_script = Some(v.into()),
                    "pulse_interval" => w.pulse_interval = Some(parse_u64(arg, &k, &v)?),
                    "timeout" => w.timeout = Some(parse_u64(arg, &k, &v)?),
                    "grace" => w.grace = Some(parse_u64(arg, &k, &v)?),
                    "iothread" => w.iothread = Some(v),
                    "follow-vm" | "follow_vm" => w.follow_vm = Some(parse_bool(arg, &k, &v)?),
                    _ => return Err(ConfigError::syntax(arg, format!("unknown key '{k}'"))),
                }
            }
            w.id = id.ok_or_else(|| ConfigError::syntax(arg, "missing id="))?;
            Ok(RawObject::Watchdog(w))
        }
        "" => Err(ConfigError::syntax(arg, "must start with the object type")),
        other => Err(ConfigError::syntax(
            arg,
            format!("unsupported object type '{other}' (awd runs advanced-watchdog objects)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_chardev_lines_parse() {
        let c = parse_chardev("socket,id=detection,host=0.0.0.0,port=9009,server,nowait").unwrap();
        assert_eq!(c.id, "detection");
        assert_eq!(c.host.as_deref(), Some("0.0.0.0"));
        assert_eq!(c.port, Some(9009));
        assert_eq!((c.server, c.wait), (Some(true), Some(false)));
        let c = parse_chardev("socket,id=h1,host=3.3.3.3,port=9009,reconnect=1").unwrap();
        assert_eq!((c.server, c.reconnect), (None, Some(1)));
    }

    #[test]
    fn the_seeds_object_line_parses() {
        let o = parse_object(
            "advanced-watchdog,id=awd1,server=on,awd_node=detection,notification_node=notification,\
             opt_script=colo_opt_script,iothread=iothread1,pulse_interval=1000,timeout=5000",
        )
        .unwrap();
        let RawObject::Watchdog(w) = o else {
            panic!("not a watchdog")
        };
        assert_eq!(w.id, "awd1");
        assert_eq!(w.timeout, Some(5000));
        assert_eq!(w.pulse_interval, Some(1000));
        assert_eq!(w.iothread.as_deref(), Some("iothread1"));
        assert!(matches!(
            parse_object("iothread,id=iothread1").unwrap(),
            RawObject::Ignored { .. }
        ));
    }

    #[test]
    fn double_comma_is_a_literal_comma() {
        let c = parse_chardev("socket,id=x,path=/tmp/a,,b").unwrap();
        assert_eq!(c.path.unwrap().to_str(), Some("/tmp/a,b"));
    }

    #[test]
    fn errors_name_the_offending_key() {
        let cases = [
            ("socket,id=x,bogus=1", "unknown key 'bogus'"),
            ("socket,host=a,port=1", "missing id="),
            ("socket,id=x,port=-1", "port=-1: expected a port number"),
            (
                "socket,id=x,server=maybe",
                "server=maybe: expected on or off",
            ),
            ("socket,id=x,,,", "empty element"),
            ("id=x", "must start with the backend type"),
        ];
        for (arg, want) in cases {
            let err = parse_chardev(arg).unwrap_err().to_string();
            assert!(err.contains(want), "{arg}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        let err = parse_object("advanced-watchdog,id=a,timeout=5s")
            .unwrap_err()
            .to_string();
        assert!(err.contains("timeout=5s: expected a whole number"), "{err}");
        let err = parse_object("memory-backend-ram,id=a")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unsupported object type 'memory-backend-ram'"),
            "{err}"
        );
    }
}
