//! systemd's readiness protocol (`sd_notify`), for units with `Type=notify`: one datagram per
//! message, `KEY=VALUE` lines, to the Unix socket named by `NOTIFY_SOCKET`. A name starting
//! with `@` is in Linux's abstract namespace (the `@` stands for the leading NUL byte).
//! Without `NOTIFY_SOCKET` nothing is sent. Written against std's `UnixDatagram`: a few lines
//! do not need a crate.

use std::ffi::OsString;
use std::io;

/// The variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Where notifications go, and the unbound socket they are sent from.
#[derive(Debug)]
pub struct Notifier {
    #[cfg(unix)]
    socket: std::os::unix::net::UnixDatagram,
    #[cfg(unix)]
    addr: std::os::unix::net::SocketAddr,
    /// `NOTIFY_SOCKET` as given, for messages.
    name: OsString,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`: `Ok(None)` when it is unset or empty (not run by systemd, or by a
    /// unit that is not `Type=notify`), an error when it names nothing usable.
    pub fn from_env() -> io::Result<Option<Self>> {
        match std::env::var_os(NOTIFY_SOCKET) {
            Some(name) if !name.is_empty() => Self::to(name).map(Some),
            _ => Ok(None),
        }
    }

    /// To the socket `name`: a path, or `@name` in the abstract namespace.
    #[cfg(unix)]
    pub fn to(name: OsString) -> io::Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let bytes = name.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(abstract_name) => abstract_addr(abstract_name)?,
            None if bytes.starts_with(b"/") => {
                SocketAddr::from_pathname(std::path::Path::new(&name))?
            }
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{NOTIFY_SOCKET}={} is neither an absolute path nor @name",
                        name.to_string_lossy()
                    ),
                ));
            }
        };
        let socket = UnixDatagram::unbound()?;
        // A notification must never hold up the service: if systemd's queue is full, the
        // send fails and is logged.
        socket.set_nonblocking(true)?;
        Ok(Self { socket, addr, name })
    }

    #[cfg(not(unix))]
    pub fn to(name: OsString) -> io::Result<Self> {
        let _ = name;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "NOTIFY_SOCKET needs Unix sockets",
        ))
    }

    /// Sends one message (`READY=1`, `STATUS=…`, `STOPPING=1`, several separated by `\n`).
    #[cfg(unix)]
    pub fn notify(&self, message: &str) -> io::Result<()> {
        let sent = self
            .socket
            .send_to_addr(message.as_bytes(), &self.addr)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("sending to {}: {e}", self.name.to_string_lossy()),
                )
            })?;
        if sent < message.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("only {sent} of {} bytes sent", message.len()),
            ));
        }
        Ok(())
    }

    #[cfg(not(unix))]
    pub fn notify(&self, _message: &str) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<std::os::unix::net::SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name)
}

#[cfg(all(unix, not(any(target_os = "linux", target_os = "android"))))]
fn abstract_addr(_name: &[u8]) -> io::Result<std::os::unix::net::SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract socket names (@…) exist on Linux only",
    ))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    use super::*;

    fn received(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn a_message_reaches_a_socket_named_by_its_path() {
        let dir = std::env::temp_dir().join(format!("fifo-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory");
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).expect("bind");
        let notifier = Notifier::to(path.clone().into_os_string()).expect("a notifier");
        notifier.notify("READY=1").expect("sent");
        assert_eq!(received(&socket), "READY=1");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_message_reaches_an_abstract_socket_named_with_an_at_sign() {
        let name = format!("fifo-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("an address");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind");
        let notifier = Notifier::to(format!("@{name}").into()).expect("a notifier");
        notifier.notify("STOPPING=1").expect("sent");
        assert_eq!(received(&socket), "STOPPING=1");
    }

    #[test]
    fn a_name_that_is_neither_a_path_nor_abstract_is_refused() {
        let err = Notifier::to("relative/notify.sock".into()).expect_err("refused");
        assert!(err.to_string().contains("NOTIFY_SOCKET"), "{err}");
    }
}
