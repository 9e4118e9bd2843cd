//! Running a ledger as a child process, as the demo and the end-to-end tests do: start it,
//! wait until it listens, signal it, stop it.

use std::io::{self, BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// How long a ledger may take to open its database and listen.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A `paystile-ledger serve` child, killed when dropped.
pub struct LedgerProcess {
    child: Child,
    address: SocketAddr,
}

impl LedgerProcess {
    /// Starts `binary serve <args>` with `envs`, its log (stderr) going to `stderr`, and waits
    /// for the line that says where it listens. Pass `--listen 127.0.0.1:0` for any free port.
    pub fn start(
        binary: &Path,
        args: &[String],
        envs: &[(String, String)],
        stderr: Stdio,
    ) -> io::Result<LedgerProcess> {
        let mut child = Command::new(binary)
            .arg("serve")
            .args(args)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| io::Error::other("no stdout"))?;
        let (line_tx, line_rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = line_tx.send(line);
        });
        let line = line_rx.recv_timeout(STARTUP_TIMEOUT).unwrap_or_default();
        let address = line
            .trim()
            .strip_prefix("paystile-ledger listening on http://")
            .and_then(|address| address.parse().ok());
        match address {
            Some(address) => Ok(LedgerProcess { child, address }),
            None => {
                let _ = child.kill();
                let status = child.wait()?;
                Err(io::Error::other(format!("the ledger did not start ({status}); see its log")))
            }
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`: the ledger gets no chance to finish anything.
    pub fn kill(&mut self) -> io::Result<()> {
        self.child.kill()?;
        self.child.wait().map(drop)
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`, …) with the system's `kill`.
    pub fn signal(&self, signal: &str) -> io::Result<()> {
        let status =
            Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!("kill -{signal} failed")))
        }
    }
}

impl Drop for LedgerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
