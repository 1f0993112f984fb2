//! Waiting for the lab's processes and states.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

/// Poll `f` every 20 ms until it is true or `timeout` passes.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let t0 = Instant::now();
    let mut last_err = None;
    loop {
        match f() {
            Ok(true) => return Ok(t0.elapsed()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if t0.elapsed() > timeout {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
