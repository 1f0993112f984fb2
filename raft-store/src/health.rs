//! Active health checks: what a service's check is (part of the service in
//! the replicated config), its validation, and the health of a backend as
//! the tier agreed on it.
//!
//! Every LB node runs the checks itself; the Raft leader marks a backend
//! down (or up) when a quorum of nodes sees it so, by committing
//! [`crate::Command::SetBackendHealth`]: all datapaths switch at the same
//! epoch.

use serde::{Deserialize, Serialize};

/// What a check sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connection is accepted.
    Tcp,
    /// `GET path` over HTTP/1.1 answers `expect_status`.
    Http,
    /// The same over TLS (the server's certificate is not verified: the
    /// check proves the service answers, not who it is).
    Https,
    /// A UDP datagram `send` is answered (with a reply starting with
    /// `expect`, if set).
    Udp,
    /// A DNS query for `query` (type A, recursion desired) is answered
    /// with the query's id and RCODE NOERROR.
    Dns,
}

impl std::fmt::Display for CheckKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Https => "https",
            CheckKind::Udp => "udp",
            CheckKind::Dns => "dns",
        })
    }
}

impl std::str::FromStr for CheckKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "http" => Ok(Self::Http),
            "https" => Ok(Self::Https),
            "udp" => Ok(Self::Udp),
            "dns" => Ok(Self::Dns),
            other => Err(format!(
                "health_check.type: {other:?} is not one of tcp, http, https, udp, dns"
            )),
        }
    }
}

/// Where a check is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// To the backend's own address (proves the host and the server on
    /// that address; not the VIP on its loopback nor the decap agent).
    #[default]
    Direct,
    /// To the VIP, encapsulated to the backend as the datapath sends client
    /// packets; the answer comes back from the VIP (proves the decap agent,
    /// the VIP and the server behind it). tcp, udp and dns checks.
    Vip,
}

impl std::str::FromStr for Via {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "direct" => Ok(Self::Direct),
            "vip" => Ok(Self::Vip),
            other => Err(format!("health_check.via: {other:?} is not direct or vip")),
        }
    }
}

/// What happens to the established flows of a backend marked down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDown {
    /// Keep following their entries until they close or time out (the
    /// backend may still serve them: a failed check is not a dead
    /// connection). The backend gets no new flows.
    Keep,
    /// Their next packet picks a healthy backend (for UDP request/response
    /// services; for TCP the new backend resets the connection).
    Repick,
}

impl std::str::FromStr for OnDown {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keep" => Ok(Self::Keep),
            "repick" => Ok(Self::Repick),
            other => Err(format!(
                "health_check.on_down: {other:?} is not keep or repick"
            )),
        }
    }
}

pub const DEFAULT_INTERVAL_MS: u32 = 2000;
pub const DEFAULT_TIMEOUT_MS: u32 = 1000;
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
pub const DEFAULT_HOLD_DOWN_MS: u32 = 5000;
pub const MIN_INTERVAL_MS: u32 = 100;
pub const MAX_INTERVAL_MS: u32 = 3_600_000;
pub const MIN_TIMEOUT_MS: u32 = 10;
pub const MAX_RISE_FALL: u32 = 100;
/// Longest UDP payload a check sends or expects.
pub const MAX_PAYLOAD: usize = 512;

fn d_interval() -> u32 {
    DEFAULT_INTERVAL_MS
}
fn d_timeout() -> u32 {
    DEFAULT_TIMEOUT_MS
}
fn d_rise() -> u32 {
    DEFAULT_RISE
}
fn d_fall() -> u32 {
    DEFAULT_FALL
}
fn d_hold_down() -> u32 {
    DEFAULT_HOLD_DOWN_MS
}

/// A service's health check. Fields not used by `type` must be left out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(rename = "type")]
    pub kind: CheckKind,
    /// Port to check on the backend's address (default: the backend's port;
    /// required for a service of every port, port 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Time between two checks of one backend from one node.
    #[serde(default = "d_interval")]
    pub interval_ms: u32,
    /// A check not answered within this fails; at most `interval_ms`.
    #[serde(default = "d_timeout")]
    pub timeout_ms: u32,
    /// Consecutive successes before a node sees a down backend up.
    #[serde(default = "d_rise")]
    pub rise: u32,
    /// Consecutive failures before a node sees an up backend down.
    #[serde(default = "d_fall")]
    pub fall: u32,
    /// A backend the tier marked down stays down at least this long, even
    /// if it passes again (flapping guard).
    #[serde(default = "d_hold_down")]
    pub hold_down_ms: u32,
    /// http/https: request path (default "/").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// http/https: Host header (default: the backend's address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// http/https: the status that passes (default 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<u16>,
    /// udp: the datagram sent (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send: Option<String>,
    /// udp: the answer must start with this (default: any answer passes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<String>,
    /// dns: the name queried (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Established flows of a backend marked down (default: keep for TCP
    /// services, repick for UDP ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_down: Option<OnDown>,
    /// direct (default) or vip: through the VIP path with encapsulation.
    #[serde(default)]
    pub via: Via,
}

impl HealthCheck {
    /// A check of `kind` with every default.
    pub fn new(kind: CheckKind) -> Self {
        Self {
            kind,
            port: None,
            interval_ms: DEFAULT_INTERVAL_MS,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            hold_down_ms: DEFAULT_HOLD_DOWN_MS,
            path: None,
            host: None,
            expect_status: None,
            send: None,
            expect: None,
            query: None,
            on_down: None,
            via: Via::Direct,
        }
    }

    /// Check the fields; the message names the field at fault.
    pub fn validate(&self, service_port: u16) -> Result<(), String> {
        let f = |field: &str, why: String| Err(format!("health_check.{field}: {why}"));
        if self.interval_ms < MIN_INTERVAL_MS || self.interval_ms > MAX_INTERVAL_MS {
            return f(
                "interval_ms",
                format!(
                    "{} must be {MIN_INTERVAL_MS}..={MAX_INTERVAL_MS} ms",
                    self.interval_ms
                ),
            );
        }
        if self.timeout_ms < MIN_TIMEOUT_MS {
            return f(
                "timeout_ms",
                format!("{} must be at least {MIN_TIMEOUT_MS} ms", self.timeout_ms),
            );
        }
        if self.timeout_ms > self.interval_ms {
            return f(
                "timeout_ms",
                format!(
                    "{} is longer than interval_ms {} (checks of one backend would overlap)",
                    self.timeout_ms, self.interval_ms
                ),
            );
        }
        for (field, v) in [("rise", self.rise), ("fall", self.fall)] {
            if v == 0 || v > MAX_RISE_FALL {
                return f(field, format!("{v} must be 1..={MAX_RISE_FALL}"));
            }
        }
        if self.hold_down_ms > MAX_INTERVAL_MS {
            return f(
                "hold_down_ms",
                format!("{} must be at most {MAX_INTERVAL_MS} ms", self.hold_down_ms),
            );
        }
        match self.port {
            Some(0) => return f("port", "0 is not a port".into()),
            None if service_port == 0 => {
                return f(
                    "port",
                    "required: the service balances every port (port 0)".into(),
                )
            }
            _ => {}
        }
        let http = matches!(self.kind, CheckKind::Http | CheckKind::Https);
        let only = |field: &str, set: bool, kinds: &str| -> Result<(), String> {
            if set {
                Err(format!(
                    "health_check.{field}: only for type {kinds}, not {}",
                    self.kind
                ))
            } else {
                Ok(())
            }
        };
        only("path", !http && self.path.is_some(), "http/https")?;
        only("host", !http && self.host.is_some(), "http/https")?;
        only(
            "expect_status",
            !http && self.expect_status.is_some(),
            "http/https",
        )?;
        only(
            "send",
            self.kind != CheckKind::Udp && self.send.is_some(),
            "udp",
        )?;
        only(
            "expect",
            self.kind != CheckKind::Udp && self.expect.is_some(),
            "udp",
        )?;
        only(
            "query",
            self.kind != CheckKind::Dns && self.query.is_some(),
            "dns",
        )?;
        if self.via == Via::Vip && matches!(self.kind, CheckKind::Http | CheckKind::Https) {
            return f(
                "via",
                format!("vip works with tcp, udp and dns checks, not {}", self.kind),
            );
        }
        if let Some(p) = &self.path {
            if !p.starts_with('/')
                || p.len() > 1024
                || p.chars().any(|c| c.is_control() || c == ' ')
            {
                return f(
                    "path",
                    format!("{p:?} must start with / and hold no spaces or control characters (at most 1024 bytes)"),
                );
            }
        }
        if let Some(h) = &self.host {
            if h.is_empty() || h.len() > 253 || h.chars().any(|c| c.is_control() || c == ' ') {
                return f(
                    "host",
                    format!("{h:?} must be 1-253 characters without spaces"),
                );
            }
        }
        if let Some(s) = self.expect_status {
            if !(100..=599).contains(&s) {
                return f("expect_status", format!("{s} is not an HTTP status"));
            }
        }
        if self.kind == CheckKind::Udp {
            match &self.send {
                None => return f("send", "required for type udp".into()),
                Some(s) if s.is_empty() || s.len() > MAX_PAYLOAD => {
                    return f("send", format!("must be 1-{MAX_PAYLOAD} bytes"))
                }
                _ => {}
            }
            if self.expect.as_ref().is_some_and(|e| e.len() > MAX_PAYLOAD) {
                return f("expect", format!("longer than {MAX_PAYLOAD} bytes"));
            }
        }
        if self.kind == CheckKind::Dns {
            match &self.query {
                None => return f("query", "required for type dns".into()),
                Some(q) => valid_dns_name(q).map_err(|e| format!("health_check.query: {e}"))?,
            }
        }
        Ok(())
    }

    /// What this check does with a down backend's flows.
    pub fn on_down(&self, service_udp: bool) -> OnDown {
        self.on_down.unwrap_or(if service_udp {
            OnDown::Repick
        } else {
            OnDown::Keep
        })
    }
}

/// A DNS name a check may query ("example.com" or "example.com.").
pub fn valid_dns_name(q: &str) -> Result<(), String> {
    let name = q.strip_suffix('.').unwrap_or(q);
    if name.is_empty() || name.len() > 253 {
        return Err(format!("{q:?} must be 1-253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty()
            || label.len() > 63
            || !label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "{q:?}: label {label:?} must be 1-63 characters of [A-Za-z0-9-_]"
            ));
        }
    }
    Ok(())
}

/// A backend's health as the tier agreed on it (committed by the leader).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Passing, or not checked.
    #[default]
    Up,
    /// A quorum of nodes sees it failing: no new flows.
    Down,
    /// A quorum sees it failing, but so are all the service's other
    /// backends: it is kept in service (the last healthy set) and the
    /// service is in panic (alert) instead of black-holing.
    Failing,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Up => "up",
            Health::Down => "down",
            Health::Failing => "failing",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_checks_name_their_field() {
        let base = HealthCheck::new(CheckKind::Tcp);
        let cases: Vec<(HealthCheck, u16, &str)> = vec![
            (
                HealthCheck {
                    interval_ms: 0,
                    ..base.clone()
                },
                80,
                "health_check.interval_ms",
            ),
            (
                HealthCheck {
                    timeout_ms: 3000,
                    interval_ms: 2000,
                    ..base.clone()
                },
                80,
                "health_check.timeout_ms: 3000 is longer than interval_ms 2000",
            ),
            (
                HealthCheck {
                    rise: 0,
                    ..base.clone()
                },
                80,
                "health_check.rise",
            ),
            (
                HealthCheck {
                    fall: 101,
                    ..base.clone()
                },
                80,
                "health_check.fall",
            ),
            (base.clone(), 0, "health_check.port: required"),
            (
                HealthCheck {
                    path: Some("/x".into()),
                    ..base.clone()
                },
                80,
                "health_check.path: only for type http/https",
            ),
            (
                HealthCheck {
                    path: Some("x y".into()),
                    ..HealthCheck::new(CheckKind::Http)
                },
                80,
                "health_check.path",
            ),
            (
                HealthCheck {
                    expect_status: Some(700),
                    ..HealthCheck::new(CheckKind::Http)
                },
                80,
                "health_check.expect_status",
            ),
            (
                HealthCheck::new(CheckKind::Udp),
                53,
                "health_check.send: required",
            ),
            (
                HealthCheck::new(CheckKind::Dns),
                53,
                "health_check.query: required",
            ),
            (
                HealthCheck {
                    query: Some("bad..name".into()),
                    ..HealthCheck::new(CheckKind::Dns)
                },
                53,
                "health_check.query",
            ),
        ];
        for (c, port, want) in cases {
            let e = c.validate(port).expect_err(want);
            assert!(e.starts_with(want), "{e:?} should start with {want:?}");
        }
        assert!(base.validate(80).is_ok());
        let dns = HealthCheck {
            query: Some("example.com.".into()),
            ..HealthCheck::new(CheckKind::Dns)
        };
        assert!(dns.validate(53).is_ok());
        assert_eq!(dns.on_down(true), OnDown::Repick);
        assert_eq!(base.on_down(false), OnDown::Keep);
        assert!("icmp"
            .parse::<CheckKind>()
            .expect_err("icmp")
            .contains("health_check.type"));
    }

    #[test]
    fn serde_defaults_and_unknown_fields() {
        let c: HealthCheck =
            serde_json::from_str(r#"{"type":"http","path":"/healthz"}"#).expect("minimal check");
        assert_eq!(c.interval_ms, DEFAULT_INTERVAL_MS);
        assert_eq!(c.fall, DEFAULT_FALL);
        let e = serde_json::from_str::<HealthCheck>(r#"{"type":"tcp","intervall_ms":5}"#)
            .expect_err("typo");
        assert!(e.to_string().contains("intervall_ms"), "{e}");
        let e = serde_json::from_str::<HealthCheck>(r#"{"type":"icmp"}"#).expect_err("icmp");
        assert!(e.to_string().contains("icmp"), "{e}");
    }
}
