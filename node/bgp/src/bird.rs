//! The BIRD 2 driver: enables and disables the static protocols that carry
//! the VIP routes through BIRD's control socket.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{announce::Announcer, policy::ExportPolicy};

/// BIRD 2 through its control socket (`bird -s PATH`).
#[derive(Debug)]
pub struct Bird {
    pub ctl: PathBuf,
    /// The protocols carrying the VIP routes (e.g. `protocol static vip`
    /// for IPv4 and `vip6` for IPv6), driven together.
    pub protocols: Vec<String>,
    /// Where the node's own host routes go (`snat_own`, `snat_own6`; an
    /// `include` of BIRD's config).
    pub own_routes_file: Option<PathBuf>,
    /// Where the node writes whether it announces ([`render_state`]), an
    /// `include` of BIRD's config whose static protocols say `disabled
    /// HOLDFAST_WITHDRAWN;`: a BIRD that restarts (graceful restart) comes
    /// back announcing exactly when the node does, before its End-of-RIB.
    /// It holds the export policy too (`holdfast_export()`).
    pub state_file: Option<PathBuf>,
    /// What the state file says: announced or not (None: not written by
    /// this process yet), and the export policy.
    rendered: std::sync::Mutex<(Option<bool>, ExportPolicy)>,
}

/// The state file: the BIRD config constant that says whether the node
/// announces (`HOLDFAST_WITHDRAWN` is 0 while it does, 1 while it does
/// not) and the function its export filters call to set the attributes of
/// the export policy (`holdfast_export()`).
pub fn render_state(announced: bool, policy: &ExportPolicy) -> String {
    format!(
        "# Written by holdfast-node: 0 while this node announces its VIPs, 1 while not.\n\
         define HOLDFAST_WITHDRAWN = {};\n\
         # The attributes of what it announces (VIP pools, graceful shutdown).\n{}",
        u8::from(!announced),
        policy.bird_function()
    )
}

/// Write `text` to `path` through a temporary file and a rename (BIRD,
/// reading it at any moment, sees the old or the new text), unless it is
/// there already. Whether it wrote.
fn write_file(path: &std::path::Path, text: &str) -> Result<bool> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(false);
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

/// The BIRD config of the node's own host routes: protocols `snat_own`
/// (IPv4) and `snat_own6` (IPv6), defined even without routes, `disabled`
/// (the node enables them with the VIPs: they are in `bgp.protocols`) —
/// or, with a state file (`with_state`), `disabled HOLDFAST_WITHDRAWN`.
pub fn render_own_routes(addrs: &[std::net::IpAddr], with_state: bool) -> String {
    let mut out =
        String::from("# Written by holdfast-node: this node's SNAT addresses (host routes).\n");
    let disabled = if with_state {
        "disabled HOLDFAST_WITHDRAWN;"
    } else {
        "disabled;"
    };
    for (name, v4) in [("snat_own", true), ("snat_own6", false)] {
        out += &format!(
            "protocol static {name} {{\n\t{disabled}\n\t{};\n",
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
    pub fn new(
        ctl: PathBuf,
        protocols: Vec<String>,
        own_routes_file: Option<PathBuf>,
        state_file: Option<PathBuf>,
    ) -> Self {
        Self {
            ctl,
            protocols,
            own_routes_file,
            state_file,
            rendered: Default::default(),
        }
    }

    /// Write the state file with `announced` (None: as it says now) and
    /// the current policy. Whether it changed.
    fn write_state(&self, announced: Option<bool>) -> Result<bool> {
        let Some(path) = &self.state_file else {
            return Ok(false);
        };
        let mut r = self.rendered.lock().expect("rendered");
        let flag = announced.or(r.0).unwrap_or_else(|| {
            // As the file says (a restarted agent): 0 means announced.
            std::fs::read_to_string(path)
                .is_ok_and(|t| t.contains("define HOLDFAST_WITHDRAWN = 0;"))
        });
        let changed = write_file(path, &render_state(flag, &r.1))?;
        r.0 = Some(flag);
        Ok(changed)
    }

    /// `configure`: BIRD reads its config files again (a refused config
    /// is an 8xxx reply: an error here).
    fn reconfigure(&self) -> Result<()> {
        let lines = self.command("configure")?;
        if lines.iter().any(|l| l.starts_with("0006")) {
            bail!("BIRD ignored the new config: {}", lines.join(" / "));
        }
        Ok(())
    }

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
        self.write_state(Some(true))?;
        for p in &self.protocols {
            self.command(&format!("enable {p}"))?;
        }
        Ok(())
    }

    /// Withdraw every family, even when one of them fails.
    fn withdraw(&self) -> Result<()> {
        self.check_names()?;
        let mut first_err = None;
        if let Err(e) = self.write_state(Some(false)) {
            first_err = Some(e);
        }
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
        if !write_file(path, &render_own_routes(addrs, self.state_file.is_some()))? {
            return Ok(false);
        }
        self.reconfigure()?;
        Ok(true)
    }

    /// Render the policy into the state file and have BIRD reload it (the
    /// protocols keep their state: the file says it). Needs a state file.
    fn set_policy(&self, policy: &ExportPolicy) -> Result<bool> {
        if self.state_file.is_none() {
            if *policy == ExportPolicy::default() {
                return Ok(false);
            }
            bail!(
                "bgp.bird_state_file: BIRD gets VIP pool attributes and the graceful-shutdown community through the state file; set it (deploy/bird/lb-node.bird.conf includes it)"
            );
        }
        self.rendered.lock().expect("rendered").1 = policy.clone();
        if !self.write_state(None)? {
            return Ok(false);
        }
        self.reconfigure()?;
        Ok(true)
    }

    fn has_own_routes(&self, addrs: &[std::net::IpAddr]) -> bool {
        match &self.own_routes_file {
            Some(path) => {
                std::fs::read_to_string(path).ok()
                    == Some(render_own_routes(addrs, self.state_file.is_some()))
            }
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
        let b = Bird::new(
            "/nonexistent".into(),
            vec!["vip".into(), "vip6; shutdown".into()],
            None,
            None,
        );
        assert!(b
            .announce()
            .unwrap_err()
            .to_string()
            .contains("not a BIRD protocol name"));
        let b = Bird::new(
            "/nonexistent/bird.ctl".into(),
            vec!["vip".into()],
            None,
            None,
        );
        assert!(b
            .announce()
            .unwrap_err()
            .to_string()
            .contains("control socket"));
    }
}
