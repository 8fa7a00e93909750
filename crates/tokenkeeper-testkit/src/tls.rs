//! A private certificate authority for TLS tests, made with the `openssl` command: a CA and a
//! server certificate for `127.0.0.1` and `localhost`, signed by it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Files of a private CA in a directory of their own (removed on drop).
#[derive(Debug)]
pub struct PrivateCa {
    /// The directory holding `ca.crt`, `server.crt` and `server.key`.
    pub dir: PathBuf,
}

impl PrivateCa {
    /// Makes a CA and a server certificate (subject alternative names `IP:127.0.0.1` and
    /// `DNS:localhost`), valid one day.
    pub fn new(tag: &str) -> PrivateCa {
        let dir = std::env::temp_dir().join(format!(
            "tokenkeeper-tls-{tag}-{}",
            crate::dirs::unique_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect(
                    "the openssl command is needed for the TLS tests (apt-get install openssl)",
                );
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=tokenkeeper test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ]);
        PrivateCa { dir }
    }

    /// The path of one of its files.
    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("ca.crt")).unwrap()
    }

    /// Copies the server certificate and key into `dir` (owned by `owner`, key mode 0600, as
    /// PostgreSQL demands).
    pub fn install_server_files(&self, dir: &Path, owner: Option<(u32, u32)>) {
        use std::os::unix::fs::PermissionsExt;
        for file in ["server.crt", "server.key"] {
            let to = dir.join(file);
            std::fs::copy(self.dir.join(file), &to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&to, Some(uid), Some(gid)).unwrap();
            }
        }
    }
}

impl Drop for PrivateCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
