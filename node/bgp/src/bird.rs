//! The BIRD 2 driver: enables and disables the static protocols that carry
//! the VIP routes through BIRD's control socket.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};

use crate::announce::Announcer;

/// BIRD 2 through its control socket (`bird -s PATH`).
#[derive(Clone, Debug)]
pub struct Bird {
    pub ctl: PathBuf,
    /// The protocols carrying the VIP routes (e.g. `protocol static vip`
    /// for IPv4 and `vip6` for IPv6), driven together.
    pub protocols: Vec<String>,
    /// Where the node's own host routes go (`snat_own`, `snat_own6`; an
    /// `include` of BIRD's config).
    pub own_routes_file: Option<PathBuf>,
}

/// The BIRD config of the node's own host routes: protocols `snat_own`
/// (IPv4) and `snat_own6` (IPv6), defined even without routes, `disabled`
/// (the node enables them with the VIPs: they are in `bgp.protocols`).
pub fn render_own_routes(addrs: &[std::net::IpAddr]) -> String {
    let mut out =
        String::from("# Written by holdfast-node: this node's SNAT addresses (host routes).\n");
    for (name, v4) in [("snat_own", true), ("snat_own6", false)] {
        out += &format!(
            "protocol static {name} {{\n\tdisabled;\n\t{};\n",
            if v4 { "ipv4" } else { "ipv6" }
        );
        for a in addrs.iter().filter(|a| a.is_ipv4() == v4) {
            out += &format!("\troute {a}/{} blackhole;\n", if v4 { 32 } else { 128 });
        }
        out += "}\n";
    }
    out
}

impl Bird {
    /// Run one CLI command; the reply lines, or the error BIRD gave.
    pub fn command(&self, cmd: &str) -> Result<Vec<String>> {
        let mut s = UnixStream::connect(&self.ctl).with_context(|| {
            format!("connecting to BIRD's control socket {}", self.ctl.display())
        })?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut greeting = String::new();
        r.read_line(&mut greeting)?;
        if !greeting.starts_with("0001 ") {
            bail!("unexpected BIRD greeting {greeting:?}");
        }
        s.write_all(format!("{cmd}\n").as_bytes())?;
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            if r.read_line(&mut l)? == 0 {
                bail!("BIRD closed the control socket during {cmd:?}");
            }
            // Only the newline: a final line may be just "0000 ".
            let l = l.trim_end_matches(['\n', '\r']).to_string();
            let code = l.get(..4).filter(|c| c.bytes().all(|b| b.is_ascii_digit()));
            let last = code.is_some() && l.as_bytes().get(4) == Some(&b' ');
            if let Some(c) = code {
                if c.starts_with('8') || c.starts_with('9') {
                    bail!("BIRD refused {cmd:?}: {}", l.get(5..).unwrap_or("").trim());
                }
            }
            lines.push(l);
            if last {
                return Ok(lines);
            }
        }
    }

    fn check_names(&self) -> Result<()> {
        if self.protocols.is_empty() {
            bail!("bgp.protocols is empty");
        }
        for p in &self.protocols {
            check_protocol_name(p)?;
        }
        Ok(())
    }
}

/// A BIRD protocol name: letters, digits, `_` (nothing BIRD's CLI would
/// read as more than a name).
pub fn check_protocol_name(p: &str) -> Result<()> {
    if p.is_empty() || p.len() > 64 || !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("bgp.protocols: {p:?} is not a BIRD protocol name");
    }
    Ok(())
}

impl Announcer for Bird {
    fn announce(&self) -> Result<()> {
        self.check_names()?;
        for p in &self.protocols {
            self.command(&format!("enable {p}"))?;
        }
        Ok(())
    }

    /// Withdraw every family, even when one of them fails.
    fn withdraw(&self) -> Result<()> {
        self.check_names()?;
        let mut first_err = None;
        for p in &self.protocols {
            if let Err(e) = self.command(&format!("disable {p}")) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Write the own host routes and have BIRD reload its config (only
    /// while withdrawn: a reload puts every protocol back to its configured
    /// `disabled` state). An unchanged file is left alone.
    fn set_own_routes(&self, addrs: &[std::net::IpAddr]) -> Result<bool> {
        let Some(path) = &self.own_routes_file else {
            return Ok(false);
        };
        let text = render_own_routes(addrs);
        if std::fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        // (A config BIRD refuses is an 8xxx reply: an error here.)
        let lines = self.command("configure")?;
        if lines.iter().any(|l| l.starts_with("0006")) {
            bail!("BIRD ignored the new config: {}", lines.join(" / "));
        }
        Ok(true)
    }

    fn has_own_routes(&self, addrs: &[std::net::IpAddr]) -> bool {
        match &self.own_routes_file {
            Some(path) => std::fs::read_to_string(path).ok() == Some(render_own_routes(addrs)),
            None => true,
        }
    }

    /// Announced only when every protocol is up (a half-announced node is
    /// announced again, which enables the missing one).
    fn is_announced(&self) -> Result<bool> {
        self.check_names()?;
        for p in &self.protocols {
            let lines = self.command(&format!("show protocols {p}"))?;
            let row = lines
                .iter()
                .find(|l| l.starts_with("1002-") || l.starts_with("1002 "))
                .ok_or_else(|| anyhow!("BIRD shows no protocol {p}"))?;
            // Name Proto Table State Since Info
            if row[5..].split_whitespace().nth(3) != Some("up") {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_names_are_checked_before_talking_to_bird() {
        let b = Bird {
            own_routes_file: None,
            ctl: "/nonexistent".into(),
            protocols: vec!["vip".into(), "vip6; shutdown".into()],
        };
        assert!(b
            .announce()
            .unwrap_err()
            .to_string()
            .contains("not a BIRD protocol name"));
        let b = Bird {
            own_routes_file: None,
            ctl: "/nonexistent/bird.ctl".into(),
            protocols: vec!["vip".into()],
        };
        assert!(b
            .announce()
            .unwrap_err()
            .to_string()
            .contains("control socket"));
    }
}
