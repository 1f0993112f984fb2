//! Who is calling and what a call needs: roles from certificates, the
//! permission of every admin endpoint and config command, and the refusals.

use std::fmt;

use raft_store::Command;
use serde::{Deserialize, Serialize};

use holdfast_pki::CertInfo;

/// The role of a client certificate (its `OU`), weakest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read only: status, members, config, conntrack, metrics.
    Viewer,
    /// Viewer, plus draining LB nodes and backends and backend weights.
    Operator,
    /// Every write: services, backends, members, VIP pools, revocations.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated caller of the admin API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// An LB node (`CN=node-<id>`, `OU=node`).
    Node(u64),
    /// A client certificate with a role.
    Client { name: String, role: Role },
}

impl Caller {
    /// The caller a CA-verified certificate names.
    pub fn from_cert(info: &CertInfo) -> Result<Caller, Refusal> {
        if let Some(id) = info.node_id() {
            return Ok(Caller::Node(id));
        }
        match info.ou.as_deref().and_then(Role::parse) {
            Some(role) if !info.cn.starts_with("node-") => Ok(Caller::Client {
                name: info.cn.clone(),
                role,
            }),
            _ => Err(Refusal::NoRole {
                subject: info.subject(),
            }),
        }
    }

    /// The value of [`crate::wire::ON_BEHALF_HEADER`] for this caller.
    pub fn header_value(&self) -> String {
        match self {
            Caller::Node(id) => format!("node-{id}"),
            Caller::Client { name, role } => format!("{role}:{name}"),
        }
    }

    pub fn parse_header(v: &str) -> Option<Caller> {
        if let Some(id) = v.strip_prefix("node-") {
            return id.parse().ok().filter(|i| *i > 0).map(Caller::Node);
        }
        let (role, name) = v.split_once(':')?;
        holdfast_pki::check_client_name(name).ok()?;
        Some(Caller::Client {
            name: name.into(),
            role: Role::parse(role)?,
        })
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Node(id) => write!(f, "node {id}"),
            Caller::Client { name, role } => write!(f, "{name} ({role})"),
        }
    }
}

/// What a call needs: a client role of at least `min`, or — where `node`
/// is set — the node certificate of exactly that node (a node acting on
/// itself: joining, registering, leaving, draining). Nodes may also read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Need {
    pub min: Role,
    pub node: Option<u64>,
}

impl Need {
    pub const READ: Need = Need {
        min: Role::Viewer,
        node: None,
    };
    pub const OPERATE: Need = Need {
        min: Role::Operator,
        node: None,
    };
    pub const ADMIN: Need = Need {
        min: Role::Admin,
        node: None,
    };

    /// `min`, or node `id` itself.
    pub fn or_node(min: Role, id: u64) -> Need {
        Need {
            min,
            node: Some(id),
        }
    }

    /// May `caller` make a call that needs this?
    pub fn allows(&self, caller: &Caller) -> bool {
        match caller {
            Caller::Node(id) => self.min == Role::Viewer || self.node == Some(*id),
            Caller::Client { role, .. } => *role >= self.min,
        }
    }

    /// Both needs at once.
    fn and(self, other: Need) -> Need {
        Need {
            min: self.min.max(other.min),
            node: match (self.node, other.node) {
                (Some(a), Some(b)) if a == b => Some(a),
                _ => None,
            },
        }
    }
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.node {
            Some(id) => write!(f, "role {} or the certificate of node {id}", self.min),
            None => write!(f, "role {}", self.min),
        }
    }
}

/// What a config command needs.
pub fn command_need(cmd: &Command) -> Need {
    match cmd {
        Command::SetBackendState { .. } | Command::SetBackendWeight { .. } => Need::OPERATE,
        Command::PutMember { member } => Need::or_node(Role::Admin, member.node_id),
        Command::Batch { commands } => commands
            .iter()
            .map(command_need)
            .reduce(Need::and)
            .unwrap_or(Need::ADMIN),
        _ => Need::ADMIN,
    }
}

/// Why the admin API refused a call; each is counted in
/// `holdfast_admin_refused_total{reason}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 401: the TLS session carries no client certificate.
    NoCertificate,
    /// 401: not issued by the cluster CA (foreign CA, self-signed, bad
    /// signature, wrong key usage).
    Untrusted { subject: String, why: String },
    /// 401: outside its validity period.
    Expired { subject: String, why: String },
    /// 401: on the cluster's revocation list.
    Revoked { subject: String, serial: String },
    /// 401: a cluster certificate without a client role or node identity.
    NoRole { subject: String },
    /// 403: authenticated, but the role does not allow the call.
    Forbidden { caller: String, why: String },
    /// Connection closed before TLS: over the connection limits.
    TooManyConnections,
    /// The TLS handshake failed or timed out.
    Handshake,
    /// 413: request body over the limit.
    BodyTooLarge,
    /// 408: the request was not received in time.
    Timeout,
}

impl Refusal {
    /// Every `reason` label, in the order they are exported.
    pub const REASONS: [&'static str; 10] = [
        "no_certificate",
        "untrusted_certificate",
        "expired_certificate",
        "revoked_certificate",
        "no_role",
        "forbidden",
        "too_many_connections",
        "handshake",
        "body_too_large",
        "timeout",
    ];

    pub fn reason(&self) -> &'static str {
        Self::REASONS[self.index()]
    }

    pub fn index(&self) -> usize {
        match self {
            Refusal::NoCertificate => 0,
            Refusal::Untrusted { .. } => 1,
            Refusal::Expired { .. } => 2,
            Refusal::Revoked { .. } => 3,
            Refusal::NoRole { .. } => 4,
            Refusal::Forbidden { .. } => 5,
            Refusal::TooManyConnections => 6,
            Refusal::Handshake => 7,
            Refusal::BodyTooLarge => 8,
            Refusal::Timeout => 9,
        }
    }

    /// HTTP status of the answer.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Forbidden { .. } => 403,
            Refusal::BodyTooLarge => 413,
            Refusal::Timeout => 408,
            Refusal::TooManyConnections | Refusal::Handshake => 503,
            _ => 401,
        }
    }

    /// The `kind` of the JSON error body.
    pub fn kind(&self) -> &'static str {
        match self.status() {
            401 => "unauthenticated",
            403 => "forbidden",
            413 => "too_large",
            408 => "timeout",
            _ => "unavailable",
        }
    }

    /// The subject of the presented certificate, for the log.
    pub fn subject(&self) -> Option<&str> {
        match self {
            Refusal::Untrusted { subject, .. }
            | Refusal::Expired { subject, .. }
            | Refusal::Revoked { subject, .. }
            | Refusal::NoRole { subject } => Some(subject),
            Refusal::Forbidden { caller, .. } => Some(caller),
            _ => None,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoCertificate => f.write_str(
                "no client certificate: the admin API needs a certificate from the cluster CA \
                 (clusterctl --cert/--key, HOLDFAST_CERT/HOLDFAST_KEY, or cert/key in clusterctl.toml)",
            ),
            Refusal::Untrusted { subject, why } => write!(
                f,
                "client certificate {subject} is not issued by this cluster's CA ({why})"
            ),
            Refusal::Expired { subject, why } => {
                write!(f, "client certificate {subject} is not valid now ({why})")
            }
            Refusal::Revoked { subject, serial } => write!(
                f,
                "client certificate {subject} (serial {serial}) is revoked"
            ),
            Refusal::NoRole { subject } => write!(
                f,
                "certificate {subject} carries no role (OU admin, operator or viewer) and is not a node certificate"
            ),
            Refusal::Forbidden { caller, why } => write!(f, "{caller}: {why}"),
            Refusal::TooManyConnections => f.write_str("too many connections"),
            Refusal::Handshake => f.write_str("TLS handshake failed"),
            Refusal::BodyTooLarge => f.write_str("request body too large"),
            Refusal::Timeout => f.write_str("request not received in time"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft_store::cluster::{BackendState, Member};

    fn member(id: u64) -> Member {
        Member {
            node_id: id,
            raft_addr: "127.0.0.1:1".into(),
            admin_addr: "127.0.0.1:2".into(),
            bgp_next_hop: None,
        }
    }

    #[test]
    fn needs_of_commands() {
        let viewer = Caller::Client {
            name: "v".into(),
            role: Role::Viewer,
        };
        let operator = Caller::Client {
            name: "o".into(),
            role: Role::Operator,
        };
        let admin = Caller::Client {
            name: "a".into(),
            role: Role::Admin,
        };
        let drain = Command::SetBackendState {
            id: 1,
            state: BackendState::Draining,
        };
        let remove = Command::RemoveBackend { id: 1 };
        let put5 = Command::PutMember { member: member(5) };
        let n = command_need(&drain);
        assert!(!n.allows(&viewer) && n.allows(&operator) && n.allows(&admin));
        assert!(
            !n.allows(&Caller::Node(5)),
            "a node does not drain backends"
        );
        let n = command_need(&remove);
        assert!(!n.allows(&operator) && n.allows(&admin));
        let n = command_need(&put5);
        assert!(n.allows(&Caller::Node(5)) && !n.allows(&Caller::Node(6)));
        assert!(!n.allows(&operator) && n.allows(&admin));
        // A batch needs what its strongest command needs.
        let b = Command::Batch {
            commands: vec![drain.clone(), remove.clone()],
        };
        assert!(!command_need(&b).allows(&operator));
        let b = Command::Batch {
            commands: vec![put5.clone(), Command::PutMember { member: member(6) }],
        };
        assert!(!command_need(&b).allows(&Caller::Node(5)));
        assert!(Need::READ.allows(&Caller::Node(9)) && Need::READ.allows(&viewer));
    }

    #[test]
    fn on_behalf_header_round_trips() {
        for c in [
            Caller::Node(7),
            Caller::Client {
                name: "alice".into(),
                role: Role::Operator,
            },
        ] {
            assert_eq!(Caller::parse_header(&c.header_value()), Some(c));
        }
        for bad in [
            "",
            "node-0",
            "node-x",
            "root:alice",
            "admin:",
            "admin:a b",
            "admin:node-1",
        ] {
            assert_eq!(Caller::parse_header(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reasons_are_distinct_and_statused() {
        let mut seen = std::collections::HashSet::new();
        for r in Refusal::REASONS {
            assert!(seen.insert(r));
        }
        assert_eq!(Refusal::NoCertificate.status(), 401);
        assert_eq!(
            Refusal::Forbidden {
                caller: "x".into(),
                why: "y".into()
            }
            .status(),
            403
        );
    }
}
